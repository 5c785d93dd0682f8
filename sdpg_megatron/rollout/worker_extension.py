"""vLLM worker side of the weight push: the `sdpg` weight-transfer engine.

vLLM's weight-transfer API drives a push with four worker calls — `init_weight_transfer_engine`,
`start_weight_update`, `update_weights` (once per bucket), `finish_weight_update` — and
delegates each to the engine that `WeightTransferEngineFactory` built from the engine's
`weight_transfer_config`. This module registers that engine under the name "sdpg"; vLLM
imports it in every worker (it is the `worker_extension_cls`) before it loads the model,
which is when the factory is asked.

The engine receives each bucket over the trainer↔engine group of `transfer.py`, checks it
against the engine's own checkpoint layout (names and shapes read from its safetensors
headers) and only stages it; the live model is touched once, at `finish_weight_update`, and
only if the staged set is the complete model. A bad bucket therefore raises a clear error
and leaves the engine serving its previous weights — loading bucket by bucket, as vLLM's
NCCL engine does, would leave a half-updated model behind. The cost is one staged copy of
the model on the engine while a push is in flight.

Two CPU-specific facts shape the commit: vLLM prepacks linear weights on CPU, so only the
in-place `reload_weights` path (which repacks) can update them; and with tied embeddings
the prepacked `lm_head` must be repacked by hand after the embedding changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

from sdpg_megatron.model.hf_io import HFCheckpoint, expected_hf_shapes
from sdpg_megatron.rollout.transfer import BACKEND_NAME, GroupAddress, WeightBucket, broadcast, open_group


@dataclass
class SdpgInitInfo(WeightTransferInitInfo, GroupAddress):
    pass


@dataclass
class SdpgUpdateInfo(WeightTransferUpdateInfo):
    names: list[str]
    shapes: list[list[int]]
    dtype_name: str
    numel: int  # length of the flat buffer the trainer broadcasts


class SdpgWeightTransferEngine(WeightTransferEngine[SdpgInitInfo, SdpgUpdateInfo]):
    init_info_cls = SdpgInitInfo
    update_info_cls = SdpgUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config, vllm_config, device, model):
        super().__init__(config, vllm_config, device, model)
        self.group = None
        self.wire_device = torch.device("cpu")
        self.expected = expected_hf_shapes(HFCheckpoint(self.model_config.model).arch)
        self.staged: dict[str, torch.Tensor] = {}

    def init_transfer_engine(self, init_info: SdpgInitInfo) -> None:
        self.shutdown()
        parallel = self.parallel_config
        rank = init_info.rank_offset + parallel.data_parallel_index * parallel.world_size + parallel.rank
        self.group = open_group(init_info, rank)
        self.wire_device = self.device if init_info.transport == "nccl" else torch.device("cpu")

    def start_weight_update(self) -> None:
        self.staged.clear()

    def update_weights(self, update_info: dict) -> None:
        # The base class ends with torch.accelerator.synchronize(), which raises on CPU.
        self.receive_weights(self.parse_update_info(update_info))
        if self.wire_device.type != "cpu":
            torch.accelerator.synchronize()

    def receive_weights(self, update_info: SdpgUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("sdpg weight transfer: init_weight_transfer_engine was not called")
        dtype = getattr(torch, update_info.dtype_name, None)
        if not isinstance(dtype, torch.dtype):  # the trainer's torch has a dtype this one lacks
            self.staged.clear()
            raise ValueError(f"weight bucket rejected, push discarded: unknown dtype {update_info.dtype_name!r}")
        flat = torch.empty(update_info.numel, dtype=dtype, device=self.wire_device)
        broadcast(self.group, flat).wait()
        try:
            self.staged.update(self._checked(update_info, flat))
        except ValueError:
            self.staged.clear()
            raise

    def _checked(self, info: SdpgUpdateInfo, flat: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        shapes = [tuple(shape) for shape in info.shapes]
        problems = [f"unknown tensor {name!r}" for name in info.names if name not in self.expected]
        problems += [
            f"{name}: shape {shape}, the engine's model has {self.expected[name]}"
            for name, shape in zip(info.names, shapes) if name in self.expected and shape != self.expected[name]
        ]
        if problems:
            raise ValueError("weight bucket rejected, push discarded: " + "; ".join(problems[:8]))
        return WeightBucket(list(info.names), shapes, flat.dtype, flat).unpack()  # checks the length

    def finish_weight_update(self) -> None:
        """Load the staged model into the live one, or raise and keep the old weights."""
        from vllm.model_executor.model_loader.reload.inplace import reload_weights

        staged, self.staged = self.staged, {}
        missing = sorted(set(self.expected) - set(staged))
        if missing:
            raise ValueError(f"incomplete weight push, {len(missing)} tensors missing (e.g. {missing[:4]}); discarded")
        ordered = [(name, staged[name]) for name in sorted(self.expected, key=_checkpoint_order)]
        reload_weights(self.vllm_config, self.model, weights_iterator=iter(ordered), weights_path=None,
                       is_checkpoint_format=True)
        lm_head = getattr(self.model, "lm_head", None)
        quant_method = getattr(lm_head, "quant_method", None)
        if quant_method is not None and getattr(lm_head, "weight", None) is not None and lm_head.weight.numel():
            quant_method.process_weights_after_loading(lm_head)  # repack a tied lm_head

    def abort(self) -> None:
        self.staged.clear()

    def shutdown(self) -> None:
        self.staged.clear()
        self.group = None  # the gloo / NCCL group closes when its last reference goes


class SdpgWorkerExtension:
    """Mixed into every vLLM worker (`worker_extension_cls`)."""

    def sdpg_abort_weight_update(self) -> None:
        """Drop a push in flight (staged buckets and the worker's active flag), so the next
        `start_weight_update` starts clean; the live weights are untouched."""
        engine = getattr(self, "weight_transfer_engine", None)
        if engine is not None:
            engine.abort()
            engine.reset_weight_update_target()
        self._weight_update_active = False


def _checkpoint_order(name: str) -> tuple[int, str]:
    """Embedding, then layer by layer, then the final norm and lm_head (as HF saves them)."""
    parts = name.split(".")
    if len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit():
        return int(parts[2]), name
    return (-1 if "embed_tokens" in name else 1 << 30), name


try:
    WeightTransferEngineFactory.register_engine(BACKEND_NAME, SdpgWeightTransferEngine)
except ValueError:  # already registered: this module was imported before in this process
    pass
