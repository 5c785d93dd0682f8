"""Methods mixed into every vLLM worker (`worker_extension_cls`): staged weight pushes.

A push is a sequence of buckets (safetensors bytes, Hugging Face names) followed by a
commit. Each bucket is checked against the engine's own checkpoint layout (names and
shapes read from its safetensors headers) when it arrives and only staged; the live model
is touched once, at commit, and only if the staged set is the complete model. A bad bucket
therefore raises a clear error and leaves the engine serving its previous weights — vLLM's
own loader would instead leave a half-loaded model and kill the engine.

Two CPU-specific facts shape the commit: vLLM prepacks linear weights on CPU, so only
`reload_weights` (which repacks) can update them; and with tied embeddings the prepacked
`lm_head` must be repacked by hand after the embedding changes.
"""

from __future__ import annotations

import torch
from safetensors.torch import load as load_safetensors

from sdpg_megatron.model.hf_io import HFCheckpoint, expected_hf_shapes


class SdpgWorkerExtension:
    def _sdpg_expected(self) -> dict[str, tuple[int, ...]]:
        if not hasattr(self, "_sdpg_shapes"):
            arch = HFCheckpoint(self.model_config.model).arch
            self._sdpg_shapes = expected_hf_shapes(arch)
            self._sdpg_staged: dict[str, torch.Tensor] = {}
        return self._sdpg_shapes

    def sdpg_stage(self, payload: bytes) -> int:
        """Validate one bucket and stage it; returns the number of staged tensors so far."""
        expected = self._sdpg_expected()
        try:
            tensors = load_safetensors(bytes(payload))
        except Exception as error:  # safetensors raises its own error types
            self._sdpg_staged.clear()
            raise ValueError(f"weight bucket is truncated or corrupted: {error}") from None
        problems = [f"unknown tensor {name!r}" for name in tensors if name not in expected]
        problems += [
            f"{name}: shape {tuple(t.shape)}, the engine's model has {expected[name]}"
            for name, t in tensors.items() if name in expected and tuple(t.shape) != expected[name]
        ]
        if problems:
            self._sdpg_staged.clear()
            raise ValueError("weight bucket rejected, push discarded: " + "; ".join(problems[:8]))
        self._sdpg_staged.update(tensors)
        return len(self._sdpg_staged)

    def sdpg_discard(self) -> None:
        self._sdpg_expected()
        self._sdpg_staged.clear()

    def sdpg_commit(self) -> int:
        """Load the staged model into the live engine; returns the number of tensors."""
        expected = self._sdpg_expected()
        missing = sorted(set(expected) - set(self._sdpg_staged))
        if missing:
            self._sdpg_staged.clear()
            raise ValueError(f"incomplete weight push, {len(missing)} tensors missing (e.g. {missing[:4]}); discarded")
        ordered = [(name, self._sdpg_staged[name]) for name in sorted(expected, key=_checkpoint_order)]
        self._sdpg_staged = {}
        self.reload_weights(weights_iterator=iter(ordered))
        lm_head = getattr(self.model_runner.model, "lm_head", None)
        quant_method = getattr(lm_head, "quant_method", None)
        if quant_method is not None and getattr(lm_head, "weight", None) is not None and lm_head.weight.numel():
            quant_method.process_weights_after_loading(lm_head)  # repack a tied lm_head
        return len(ordered)


def _checkpoint_order(name: str) -> tuple[int, str]:
    """Embedding, then layer by layer, then the final norm and lm_head (as HF saves them)."""
    parts = name.split(".")
    if len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit():
        return int(parts[2]), name
    return (-1 if "embed_tokens" in name else 1 << 30), name
