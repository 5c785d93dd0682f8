"""Run Megatron-Core on CPU (gloo): the one place that papers over its CUDA assumptions.

Megatron-Core is written for GPUs. On a machine without CUDA (tests, CI, the embedded
demo) three kinds of assumption break, and each is mapped here, nowhere else:

1. hard-coded devices — `torch.cuda.current_device()`, `device="cuda"`, `.cuda()`,
   `pin_memory()`, `tensor.type() == 'torch.cuda.FloatTensor'`: a torch function mode
   rewrites every CUDA device to the CPU and reports CPU tensors under CUDA type names;
2. device queries and streams — `torch.cuda.synchronize`, `current_stream`, `Event`,
   memory statistics, NVTX ranges: no-op stand-ins;
3. the model-parallel RNG tracker and activation recomputation's RNG save/restore — they
   keep CUDA generator states: the same bookkeeping on the CPU generator;
4. the MoE token dispatcher's device-to-host copy of its all-to-all split sizes, which
   yields numpy arrays only for CUDA tensors: CPU tensors are converted the same way.

Custom autograd Functions' backwards (Megatron's sequence-parallel collectives, its
recomputation) run under the same device mode as the forward.

`apply_cpu_shim()` is idempotent and does nothing when CUDA is available, so the GPU path
runs Megatron-Core untouched.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch.overrides import TorchFunctionMode

_applied = False
_lock = threading.Lock()


def apply_cpu_shim() -> bool:
    """Apply the shim if CUDA is absent; returns whether it is active."""
    global _applied
    if torch.cuda.is_available():
        return False
    with _lock:
        if not _applied:
            _patch_cuda_module()
            _patch_rng_tracker()
            _patch_function_backward()
            _patch_moe_split_sizes()
            _CudaToCpuMode().__enter__()  # stays on the mode stack for the process
            _applied = True
    return True


# --------------------------------------------------------------------------- 1. devices


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int is a CUDA ordinal in torch's device arguments.
    return isinstance(device, int) and not isinstance(device, bool)


_CPU = torch.device("cpu")


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to the CPU on every torch call."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.cuda, torch.Tensor.pin_memory):
            return args[0]
        if func is torch.Tensor.is_pinned:
            return False
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Megatron asserts grads are 'torch.cuda.FloatTensor'; the CPU name lacks '.cuda'.
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": _CPU}
        if func is torch.Tensor.to and len(args) > 1:
            if _is_cuda_device(args[1]):
                args = (args[0], _CPU, *args[2:])
        if "pin_memory" in kwargs:
            kwargs = {**kwargs, "pin_memory": False}
        return func(*args, **kwargs)


def _patch_function_backward() -> None:
    """Run every custom autograd Function's backward under the device mode.

    `torch.autograd.backward` reaches the autograd engine through the mode's handler, and
    a mode is popped while its own handler runs, so backward code would otherwise see no
    mode at all. Megatron's backwards build tensors on "cuda" (sequence parallelism's
    gathers and scatters, activation recomputation's re-run forward); the engine calls
    each Python Function's backward through `BackwardCFunction.apply`, so the mode is
    pushed again there."""
    from torch.autograd.function import BackwardCFunction

    apply = BackwardCFunction.apply

    def apply_on_cpu(self, *args):
        with _CudaToCpuMode():
            return apply(self, *args)

    BackwardCFunction.apply = apply_on_cpu


# --------------------------------------------------------------------------- 2. queries


class _NullStream:
    def __init__(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return _NullEvent()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _NullEvent(_NullStream):
    def record(self, stream=None):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _patch_cuda_module() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.device_count = lambda: 1
    cuda.set_device = lambda device: None
    cuda.synchronize = lambda device=None: None
    cuda.empty_cache = lambda: None
    cuda.current_stream = lambda device=None: _NullStream()
    cuda.default_stream = lambda device=None: _NullStream()
    cuda.Stream = _NullStream
    cuda.Event = _NullEvent
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.get_device_capability = lambda device=None: (0, 0)
    cuda.get_device_name = lambda device=None: "cpu"
    cuda.memory_allocated = lambda device=None: 0
    cuda.max_memory_allocated = lambda device=None: 0
    cuda.memory_reserved = lambda device=None: 0
    cuda.max_memory_reserved = lambda device=None: 0
    cuda.reset_peak_memory_stats = lambda device=None: None
    cuda.nvtx.range_push = lambda msg: None
    cuda.nvtx.range_pop = lambda: None


# --------------------------------------------------------------------------- 3. RNG tracker


def _patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    class CpuRNGStatesTracker(mcore_random.CudaRNGStatesTracker):
        """Megatron's named RNG states, kept as CPU generator states."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            generator = torch.Generator().manual_seed(seed)
            self.states_[name] = generator.get_state()

        @contextlib.contextmanager
        def fork(self, name=mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer_state = torch.get_rng_state()
            outer_name = self._current_state_name
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                self._current_state_name = outer_name
                torch.set_rng_state(outer_state)

    mcore_random.CudaRNGStatesTracker = CpuRNGStatesTracker
    mcore_random._CUDA_RNG_STATE_TRACKER = None  # re-created with the CPU class on next use
    # Activation recomputation (CheckpointFunction) saves and restores "the CUDA state" next
    # to the CPU one; here the device generator is the CPU generator.
    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda new_state, *args, **kwargs: torch.set_rng_state(new_state)


# --------------------------------------------------------------------------- 4. MoE dispatch


def _patch_moe_split_sizes() -> None:
    """`maybe_move_tensor_to_cpu(t, as_numpy=True)` returns a numpy array for a CUDA tensor
    and the tensor itself otherwise; the all-to-all then passes it as split sizes, which
    torch.distributed takes as a sequence of ints only. Give CPU tensors the GPU path's
    numpy form."""
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu

    def move_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = move_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = move_to_cpu
