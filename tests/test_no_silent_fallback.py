"""No silent fallback in the loss and model building (docs/STYLE.md, practice 13): a slower
path taken because something failed is logged once with the reason and the fix, or the
configured choice refuses with a ValueError naming the setting.

On CPU the GPU cases are simulated: a stand-in with a CUDA device and bf16 dtype for the
backend choice, a hidden Triton kernel module, a GPU without transformer-engine.
"""

from __future__ import annotations

import logging
import sys
from types import SimpleNamespace

import pytest
import torch

import sdpg_megatron.parallel
from sdpg_megatron.model import provider
from sdpg_megatron.parallel import chunks, vocab_parallel
from sdpg_megatron.parallel.vocab_parallel import resolve_backend, vocab_parallel_token_stats

CUDA_BF16 = SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16)  # what resolve_backend reads


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Each test sees every once-only warning afresh, and no cached GEMM probe."""
    for module in (vocab_parallel, chunks, provider):
        module._warn_once.cache_clear()
    monkeypatch.setattr(chunks, "_fp32_output", {})
    yield
    for module in (vocab_parallel, chunks, provider):
        module._warn_once.cache_clear()


@pytest.fixture
def triton_kernels_missing(monkeypatch):
    """`from sdpg_megatron.parallel import triton_token_stats` raises ImportError, as when
    triton is not installed (or does not match this torch)."""
    monkeypatch.delattr(sdpg_megatron.parallel, "triton_token_stats", raising=False)
    monkeypatch.setitem(sys.modules, "sdpg_megatron.parallel.triton_token_stats", None)


def _warnings(caplog, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno == logging.WARNING]


# --------------------------------------------------------------------------- Triton kernels


def test_auto_on_a_gpu_without_triton_says_so_once(triton_kernels_missing, caplog):
    with caplog.at_level(logging.WARNING):
        assert resolve_backend("auto", CUDA_BF16) == "torch"
        assert resolve_backend("auto", CUDA_BF16) == "torch"
    (message,) = _warnings(caplog, vocab_parallel.logger.name)
    assert "model.loss_backend=auto" in message and "do not import" in message
    assert "ModuleNotFoundError" in message  # the reason
    assert "requirements/gpu.txt" in message and "model.loss_backend=torch" in message  # the fixes


def test_triton_backend_without_triton_refuses(triton_kernels_missing, caplog):
    with pytest.raises(ValueError, match=r"model.loss_backend=triton.*do not import.*model.loss_backend=torch"):
        resolve_backend("triton", CUDA_BF16)
    assert not _warnings(caplog, vocab_parallel.logger.name)


def test_torch_backend_and_cpu_inputs_need_no_triton_and_say_nothing(triton_kernels_missing, caplog):
    with caplog.at_level(logging.WARNING):
        assert resolve_backend("torch", CUDA_BF16) == "torch"  # chosen: nothing to report
        assert resolve_backend("auto", SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32)) == "torch"
        assert resolve_backend("auto", torch.zeros(2, 3, dtype=torch.bfloat16)) == "torch"  # CPU by design
        hidden = torch.randn(4, 8, requires_grad=True)
        weight = torch.randn(16, 8, requires_grad=True)
        stats = vocab_parallel_token_stats(hidden, weight, torch.tensor([0, 3, 7, 15]))
        stats.logprobs.sum().backward()
    assert not _warnings(caplog, vocab_parallel.logger.name)


def test_the_backend_is_the_callers_setting_not_the_environment(monkeypatch):
    monkeypatch.setenv("SDPG_LOSS_BACKEND", "triton")  # the retired override is not read
    assert resolve_backend("auto", torch.zeros(2, 3, dtype=torch.bfloat16)) == "torch"
    with pytest.raises(ValueError, match="model.loss_backend"):
        resolve_backend("fast", torch.zeros(2, 3))


# --------------------------------------------------------------------------- fp32-output GEMMs


def test_an_unsupported_fp32_output_gemm_says_so_once(caplog):
    # CPU torch has no mm/addmm with out_dtype: the same "not supported" a GPU's older torch gives
    operand = torch.zeros(4, 4, dtype=torch.bfloat16)
    with caplog.at_level(logging.WARNING):
        assert chunks.fp32_output_supported("mm", operand) is False
        assert chunks.fp32_output_supported("mm", operand) is False
        assert chunks.fp32_output_supported("addmm", operand) is False
    mm_message, addmm_message = _warnings(caplog, chunks.logger.name)
    assert "torch.mm" in mm_message and "torch.addmm" in addmm_message
    assert "NotImplementedError" in mm_message  # the reason
    assert "fp32 temporary" in mm_message and "Fix:" in mm_message
    assert chunks.fp32_output_gemms() == {"mm/cpu/bfloat16": False, "addmm/cpu/bfloat16": False}


def test_out_of_memory_in_the_gemm_probe_is_raised_not_read_as_unsupported(monkeypatch, caplog):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(torch, "mm", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        chunks.fp32_output_supported("mm", torch.zeros(4, 4, dtype=torch.bfloat16))
    assert chunks.fp32_output_gemms() == {}  # nothing decided: the next call probes again
    assert not _warnings(caplog, chunks.logger.name)


# --------------------------------------------------------------------------- transformer-engine


def test_a_gpu_without_transformer_engine_says_so_once(monkeypatch, caplog):
    monkeypatch.setattr(provider.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(provider, "transformer_engine_available", lambda: False)
    with caplog.at_level(logging.WARNING):
        assert provider.resolve_transformer_engine(None) is False
        spec = provider.layer_spec()
    assert spec.submodules.input_layernorm is provider.RMSNorm  # the local spec
    (message,) = _warnings(caplog, provider.logger.name)
    assert "transformer-engine is not installed" in message and "local layer spec" in message
    assert "layout.py" in message and "requirements/gpu.txt" in message


def test_asking_for_transformer_engine_without_it_refuses(monkeypatch):
    monkeypatch.setattr(provider, "transformer_engine_available", lambda: False)
    with pytest.raises(ValueError, match="use_transformer_engine=True needs transformer-engine"):
        provider.layer_spec(use_transformer_engine=True)


def test_cpu_builds_the_local_spec_silently(caplog):
    if torch.cuda.is_available():
        pytest.skip("a CPU-only check")
    with caplog.at_level(logging.WARNING):
        assert provider.resolve_transformer_engine(None) is False
        assert provider.resolve_transformer_engine(False) is False
    assert not _warnings(caplog, provider.logger.name)
