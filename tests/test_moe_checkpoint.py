"""A Qwen3-MoE training checkpoint at EP2 resumes exactly, and refuses another EP size.

From the tiny MoE's HF weights take step A at EP2 (distributed optimizer: experts' Adam
state sharded over expert-data-parallel ranks), save, take step B; then rebuild the policy
from a random init, load, take step B again: loss, grad norm, the load-balancing loss and
every parameter (each EP rank's own experts) must be identical. Loading the EP2
checkpoint at EP1 is refused with the sizes named.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_distributed
from tests.helpers import VOCAB, checkpoint_tensors, nll_train_step, tiny_moe_hf_model

GLOBAL_BATCH, SEQ = 2, 8


def _build(ep: int, *, seed: int, from_hf: bool):
    from sdpg_megatron.config import OptimizerConfig
    from sdpg_megatron.model.hf_mapping import load_hf_weights
    from sdpg_megatron.model.training import build_policy
    from sdpg_megatron.parallel import padded_vocab_size
    from sdpg_megatron.parallel.groups import initialize_parallel

    groups = initialize_parallel(tensor_parallel=1, pipeline_parallel=1, expert_parallel=ep, seed=seed)
    arch, hf_model = tiny_moe_hf_model()
    tensors = checkpoint_tensors(hf_model)
    load = (lambda m: load_hf_weights(m, arch, tensors.__getitem__, padded_vocab=padded_vocab_size(VOCAB, 1),
                                      tp_size=1, tp_rank=0, pp_size=1, pp_rank=0, ep_size=ep, ep_rank=groups.ep_rank))
    settings = OptimizerConfig(lr=1e-3, lr_warmup_steps=3, use_distributed_optimizer=True)
    return arch, groups, build_policy(arch, groups, settings, load_weights=load if from_hf else None)


def _step(arch, groups, policy, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=generator)
    result, loss = nll_train_step(policy, groups, arch, tokens, torch.ones(GLOBAL_BATCH, SEQ))
    return {"loss": loss, "grad_norm": result.grad_norm, **result.router,
            "params": [p.detach().clone() for p in policy.module.parameters()]}


def _worker(rank: int, world_size: int, root: str) -> dict:
    from pathlib import Path

    from sdpg_megatron.checkpoint import load_checkpoint, save_checkpoint
    from sdpg_megatron.parallel.groups import destroy_parallel

    arch, groups, policy = _build(2, seed=0, from_hf=True)
    for seed in (1, 3):
        _step(arch, groups, policy, seed)
    save_checkpoint(Path(root), 1, policy, groups, {"step": 1})
    original = _step(arch, groups, policy, 2)
    destroy_parallel()

    arch, groups, policy = _build(2, seed=1234, from_hf=False)
    load_checkpoint(Path(root), policy, groups)
    resumed = _step(arch, groups, policy, 2)
    destroy_parallel()

    _, groups, policy = _build(1, seed=0, from_hf=False)  # EP1: the experts' optimizer shards do not fit
    try:
        load_checkpoint(Path(root), policy, groups)
        refusal = None
    except ValueError as error:
        refusal = str(error)
    destroy_parallel()
    return {
        "original": {k: v for k, v in original.items() if k != "params"},
        "resumed": {k: v for k, v in resumed.items() if k != "params"},
        "max_param_diff": max((a - b).abs().max().item() for a, b in zip(original["params"], resumed["params"])),
        "refusal": refusal,
    }


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    return run_distributed(_worker, 2, str(tmp_path_factory.mktemp("moe_checkpoints")))


def test_moe_resume_at_ep2_is_exact(resumed):
    for report in resumed:
        original, again = report["original"], report["resumed"]
        assert again["grad_norm"] == original["grad_norm"]
        assert again["loss"] == original["loss"]
        assert again["moe/load_balancing_loss"] == original["moe/load_balancing_loss"]
        assert report["max_param_diff"] == 0.0


def test_moe_checkpoint_refuses_another_expert_parallel_size(resumed):
    for report in resumed:
        assert report["refusal"] and "EP 2" in report["refusal"] and "EP 1" in report["refusal"], report["refusal"]
