"""Starting a rollout fleet, and the sampling settings training and evaluation share.

`running_fleet` is the one way a fleet is started: it connects to Ray (a local instance,
with its temporary files in a fresh short directory under /tmp, unless the settings name
an address), starts the engines, and on leaving — normally, on an error, on SIGTERM
unwinding the stack — stops the engines and whatever Ray instance it started. The
trainer's driver and `python -m sdpg_megatron.evaluate` both use it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Iterator

import ray

from sdpg_megatron.config import Config, RolloutConfig
from sdpg_megatron.rollout.engine import EngineSettings, SamplingSettings
from sdpg_megatron.rollout.fleet import FleetSettings, RolloutFleet, connect_ray


def fleet_settings(config: Config) -> FleetSettings:
    """The fleet of `config.rollout`, serving `config.model.hf_dir`."""
    r = config.rollout
    engine = EngineSettings(
        model_dir=config.model.hf_dir, tensor_parallel=r.engine_tensor_parallel, dtype=r.dtype,
        max_model_len=config.data.max_prompt_tokens + r.max_response_tokens,
        max_num_seqs=r.max_num_seqs, kv_cache_bytes=r.kv_cache_bytes,
        gpu_memory_utilization=r.gpu_memory_utilization, cpu_threads_bind=r.cpu_threads_bind,
        seed=config.schedule.seed,
    )
    return FleetSettings(
        num_engines=r.num_engines, engine=engine, cpus_per_engine=r.cpus_per_engine,
        gpus_per_engine=r.gpus_per_engine, request_timeout_s=r.request_timeout_s,
        max_restarts=r.max_restarts, ray_address=r.ray_address,
        weight_transport=r.weight_transport, weight_sync_timeout_s=r.weight_sync_timeout_s,
    )


def sampling_settings(rollout: RolloutConfig, tokenizer, *, max_tokens: int) -> SamplingSettings:
    """The engines' sampling for training rollouts and evaluation alike: rollout's
    temperature, top_p and top_k, responses ending at the tokenizer's EOS."""
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no EOS token: responses "
                         "would run to max_tokens; use the model's own tokenizer (model.tokenizer_dir)")
    return SamplingSettings(temperature=rollout.temperature, top_p=rollout.top_p, top_k=rollout.top_k,
                            max_tokens=max_tokens, stop_token_ids=(tokenizer.eos_token_id,))


@contextmanager
def running_fleet(settings: FleetSettings, *, num_cpus: int | None = None) -> Iterator[RolloutFleet]:
    """A started `RolloutFleet`, stopped on exit with the Ray instance started for it.

    num_cpus: the CPUs of a local Ray instance (None: Ray counts them). When Ray is already
    connected (a test session's shared instance) it is used and left running."""
    ray_dir, cache_root = None, None
    started_ray = not ray.is_initialized()
    if started_ray and settings.ray_address is None:
        ray_dir = tempfile.mkdtemp(prefix="sdpg-ray-", dir="/tmp")  # Ray's socket paths must be short
        if "VLLM_CACHE_ROOT" not in os.environ:  # vLLM's compile cache goes with the instance (unless set)
            cache_root = os.environ["VLLM_CACHE_ROOT"] = os.path.join(ray_dir, "vllm-cache")
    fleet = None
    try:
        if started_ray:
            connect_ray(temp_dir=ray_dir, address=settings.ray_address, num_cpus=num_cpus)
        fleet = RolloutFleet(settings)
        yield fleet
    finally:
        try:
            if fleet is not None:
                fleet.shutdown()
        finally:
            if started_ray:
                ray.shutdown()
            if cache_root is not None and os.environ.get("VLLM_CACHE_ROOT") == cache_root:
                del os.environ["VLLM_CACHE_ROOT"]
            if ray_dir is not None:
                shutil.rmtree(ray_dir, ignore_errors=True)
