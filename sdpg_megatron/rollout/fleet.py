"""A fleet of vLLM engines managed by Ray, owned by trainer rank 0.

- Engines are named Ray actors in one placement group (a bundle of CPUs, or GPUs, per
  engine); a local Ray instance is started unless an address is given (Slurm).
- `generate` spreads prompts over engines, returns exactly n responses per prompt with the
  sampled tokens' log-probs, finish reason and weight version, and refuses responses from
  stale weights. A batch whose engine dies or times out is retried on a restarted engine.
- `push_weights` streams buckets to every engine through vLLM's weight-transfer API (the
  "sdpg" engine), then commits a new version. Each engine's wire is its own (`transports`):
  an engine on the trainer's Ray node reads the buckets in place from the fleet's reusable
  shared buffers (`shared_memory.py`: /dev/shm, or CUDA IPC), any other engine receives
  them by broadcast over a trainer↔engine process group (`transfer.py`, gloo or NCCL).
  The last committed push stays where a restarted engine can get it before it serves
  again: in the shared buffers, or in Ray's object store when there are none.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np
import ray
import torch.distributed as dist
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from sdpg_megatron.config import WeightTransport
from sdpg_megatron.rollout import transfer
from sdpg_megatron.rollout.buckets import WeightBucket
from sdpg_megatron.rollout.engine import EngineSettings, SamplingSettings, VLLMEngine
from sdpg_megatron.rollout.shared_memory import KINDS as SAME_NODE_WIRES, BucketBuffers

logger = logging.getLogger(__name__)
NAMESPACE = "sdpg"


@dataclass
class Rollout:
    prompt_index: int
    token_ids: list[int]
    logprobs: list[float]  # log π_old of each sampled token (T-scaled, as sampled)
    finish_reason: str  # "stop" (EOS / stop token) or "length" (max_tokens)
    weight_version: int
    # MoE models: the engine's expert ids [len(token_ids), MoE layers, top_k] at the positions
    # predicting each token (engine.py); None for dense models
    routed_experts: np.ndarray | None = None


class StaleWeightsError(RuntimeError):
    pass


class EngineFailedError(RuntimeError):
    pass


@dataclass(kw_only=True)
class FleetSettings:
    num_engines: int = 1
    engine: EngineSettings
    cpus_per_engine: float = 1.0
    gpus_per_engine: float = 0.0
    request_timeout_s: float = 600.0
    max_restarts: int = 2  # per engine per batch
    ray_address: str | None = None  # None: a local Ray instance
    name: str = "sdpg"  # engines are the named actors NAME-engine-0, NAME-engine-1, ...
    # "auto": shm for an engine on the trainer's node, gloo for any other; or one of
    # "shm", "cuda_ipc" (same node only), "gloo", "nccl" for every engine
    weight_transport: WeightTransport = "auto"
    weight_sync_timeout_s: float = 300.0  # joining a weight group, and each bucket's broadcast


class RolloutFleet:
    def __init__(self, settings: FleetSettings):
        self.settings = settings
        connect_ray(address=settings.ray_address)
        bundle = {"CPU": settings.cpus_per_engine}
        if settings.gpus_per_engine:
            bundle["GPU"] = settings.gpus_per_engine
        self.placement_group = placement_group([dict(bundle) for _ in range(settings.num_engines)], strategy="PACK")
        ray.get(self.placement_group.ready(), timeout=600)
        self.version = 0
        self._weights: list = []  # the last committed push, for restarts: buckets, or their Ray object refs
        # engine index → its weight group (rank 0 is this process) and the group's store
        self._links: dict[int, tuple[dist.ProcessGroup, dist.TCPStore]] = {}
        self.engines = [None] * settings.num_engines
        started = time.perf_counter()
        handles = [self._start(i) for i in range(settings.num_engines)]
        ready = ray.get([h.ready.remote() for h in handles])
        self.transports = [self._transport(info) for info in ready]  # each engine's wire for weight pushes
        shared = {t for t in self.transports if t in SAME_NODE_WIRES}
        self.buffers = BucketBuffers(shared.pop()) if shared else None
        logger.info("rollout fleet: weight transport per engine: %s", ", ".join(self.transports))
        logger.info("rollout fleet: %d engine(s) ready in %.1f s", settings.num_engines, time.perf_counter() - started)

    # ------------------------------------------------------------------ engines

    def engine_name(self, index: int) -> str:
        return f"{self.settings.name}-engine-{index}"

    def _transport(self, ready: dict) -> str:
        """An engine's wire: same-node buffers where it shares the trainer's node, else a group."""
        wanted = self.settings.weight_transport
        local = ready["node_id"] == ray.get_runtime_context().get_node_id()
        if wanted == "auto":
            return "shm" if local else "gloo"
        if wanted in SAME_NODE_WIRES and not local:
            raise EngineFailedError(
                f"rollout.weight_transport={wanted} needs every engine on the trainer's node, but "
                f"{ready['name']} runs on host {ready['host']}: use 'auto' (shared memory where it can, "
                f"gloo elsewhere), 'gloo' or 'nccl'"
            )
        return wanted

    def bucket_allocator(self):
        """Where the next push's buckets are to be written (ask once per push, before they are
        made): the shared buffers from the first one on, or None (fresh tensors)."""
        if self.buffers is None:
            return None
        self.buffers.start_push()
        return self.buffers.next_buffer

    def _start(self, index: int):
        actor = ray.remote(VLLMEngine).options(
            name=self.engine_name(index), num_cpus=self.settings.cpus_per_engine,
            num_gpus=self.settings.gpus_per_engine, max_restarts=0, lifetime=None,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=self.placement_group, placement_group_bundle_index=index),
        )
        handle = actor.remote(self.settings.engine, self.engine_name(index))
        self.engines[index] = handle
        return handle

    def restart(self, index: int) -> None:
        """Replace engine `index` with a fresh one carrying the current weights."""
        old = self.engines[index]
        if old is not None:
            ray.kill(old, no_restart=True)
        _wait_until_gone(self.engine_name(index))
        self._links.pop(index, None)
        handle = self._start(index)
        ray.get(handle.ready.remote(), timeout=self.settings.request_timeout_s)
        if self._weights:
            try:
                self._begin([index])
                for bucket in self._weights:
                    self._send(bucket if self.buffers is not None else ray.get(bucket), [index])
                self._commit([index], self.version)
            except BaseException:
                self._abort([index])
                raise
        logger.warning("rollout fleet: restarted %s at weight version %d", self.engine_name(index), self.version)

    # ------------------------------------------------------------------ weights

    def push_weights(self, buckets: Iterable[WeightBucket], version: int) -> dict:
        """Send every bucket to every engine as it comes, then commit `version` everywhere.

        An engine checks each bucket and stages it; it loads the staged model only at the
        commit, and only if it is complete. On any error every engine drops the push and
        keeps serving the previous version. With shared buffers, buckets written where
        `bucket_allocator()` said cost nothing more; any other bucket is copied there first."""
        if version <= self.version:
            raise ValueError(f"weight version must increase: fleet is at {self.version}, push says {version}")
        started, payloads, num_bytes = time.perf_counter(), [], 0
        everyone = range(len(self.engines))
        if self.buffers is not None and not self.buffers.pushing:
            self.buffers.start_push()
        try:
            self._begin(everyone)
            begun = time.perf_counter()
            for bucket in buckets:
                if self.buffers is not None and self.buffers.key_of(bucket.flat) is None:
                    bucket = self._to_shared(bucket)
                payloads.append(bucket if self.buffers is not None else ray.put(bucket))
                num_bytes += bucket.num_bytes
                self._send(bucket, everyone)
            sent = time.perf_counter()
            commits = self._commit(everyone, version)
        except BaseException:
            self._abort(everyone)
            if self.buffers is not None:
                self.buffers.finish_push(committed=False)
            raise
        if self.buffers is not None:
            self.buffers.finish_push(committed=True)
        self._weights, self.version = payloads, version
        done = time.perf_counter()
        return {"buckets": len(payloads), "bytes": num_bytes, "seconds": done - started,
                "start_s": begun - started, "send_s": sent - begun, "commit_s": done - sent,
                **{f"commit_{phase}": max(c[phase] for c in commits) for phase in commits[0]}}

    def _to_shared(self, bucket: WeightBucket) -> WeightBucket:
        flat = self.buffers.next_buffer(bucket.flat.numel(), bucket.flat.dtype)
        flat.copy_(bucket.flat)
        return WeightBucket(bucket.names, bucket.shapes, bucket.dtype, flat)

    def _connect(self, index: int) -> None:
        """Open the weight group between this process (rank 0) and engine `index`'s workers."""
        s = self.settings
        address, store = transfer.listen(1 + s.engine.tensor_parallel, self.transports[index], s.weight_sync_timeout_s)
        # Both ends block until the group is complete: join from a side thread while the
        # engine's workers join through vLLM. If they fail, the thread ends at the timeout.
        pool = ThreadPoolExecutor(max_workers=1)
        try:
            group = pool.submit(transfer.open_group, address, 0, store)
            ray.get(self.engines[index].init_weight_transfer_engine.remote(asdict(address)),
                    timeout=s.weight_sync_timeout_s)
            self._links[index] = (group.result(), store)
        finally:
            pool.shutdown(wait=False)

    def _begin(self, indices: Sequence[int]) -> None:
        for index in indices:
            if index not in self._links and self.transports[index] in transfer.TRANSPORTS:
                self._connect(index)
        ray.get([self.engines[i].start_weight_update.remote() for i in indices], timeout=self.settings.request_timeout_s)

    def _send(self, bucket: WeightBucket, indices: Sequence[int]) -> None:
        """One bucket to engines `indices`: metadata through `update_weights`; the bytes are
        read in place from the shared buffer, or broadcast over the engine's group."""
        info = transfer.update_info(bucket)
        key = None if self.buffers is None else self.buffers.key_of(bucket.flat)
        shared = dict(info, buffer=self.buffers.describe(key)) if key is not None else None
        local = [i for i in indices if self.transports[i] in SAME_NODE_WIRES]
        if local and shared is None:
            raise ValueError("a bucket for a same-node engine must be written into fleet.bucket_allocator()'s buffers")
        remote = [i for i in indices if i not in local]
        receiving = [self.engines[i].update_weights.remote(shared) for i in local]
        receiving += [self.engines[i].update_weights.remote(info) for i in remote]
        wire = bucket.flat.cuda() if remote and self.settings.weight_transport == "nccl" else bucket.flat
        sending = {i: transfer.broadcast(self._links[i][0], wire) for i in remote}  # all at once
        for index, work in sending.items():
            try:
                work.wait()
            except Exception as error:
                self._links.pop(index, None)  # a group whose collective failed is unusable
                raise EngineFailedError(f"weight push to {self.engine_name(index)} failed: {error}") from None
        ray.get(receiving, timeout=self.settings.weight_sync_timeout_s)

    def _commit(self, indices: Sequence[int], version: int) -> list[dict[str, float]]:
        """Commit everywhere; each engine's commit phases (seconds)."""
        return ray.get([self.engines[i].finish_weight_update.remote(version) for i in indices],
                       timeout=self.settings.request_timeout_s)

    def _abort(self, indices: Sequence[int]) -> None:
        """Best effort: an engine that died cannot abort and needs nothing dropped."""
        refs = [self.engines[i].abort_weight_update.remote() for i in indices]
        for index, ref in zip(indices, refs):
            try:
                ray.get(ref, timeout=60)
            except Exception as error:  # noqa: BLE001 (the push's own error is the one raised)
                self._links.pop(index, None)
                logger.warning("rollout fleet: %s could not abort the push: %s", self.engine_name(index), error)

    # ------------------------------------------------------------------ generation

    def generate(
        self, prompts: list[list[int]], n: int, sampling: SamplingSettings, *, seed: int | None = None,
        expected_version: int | None = None,
    ) -> list[list[Rollout]]:
        """n rollouts for each prompt, in prompt order; sample k of prompt p is seeded from
        (seed, p, k), so a batch is reproducible and no two samples share a random stream.

        Every response must come from weight version `expected_version` (None: the fleet's
        version at the call); one from any other raises StaleWeightsError. The one-step-off
        rollout names the version it generates from, since it runs beside the trainer's step
        (the push that changes the version waits for it)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        expected = self.version if expected_version is None else expected_version
        shards = [list(range(i, len(prompts), len(self.engines))) for i in range(len(self.engines))]
        requests = {
            i: [(prompts[p], n, None if seed is None else seed * 1_000_003 + p * n) for p in shard]
            for i, shard in enumerate(shards) if shard
        }
        pending = {i: self.engines[i].generate.remote(reqs, sampling) for i, reqs in requests.items()}
        restarts = {i: 0 for i in requests}
        results: dict[int, dict] = {}
        while pending:
            index, ref = next(iter(pending.items()))
            try:
                results[index] = ray.get(ref, timeout=self.settings.request_timeout_s)
                del pending[index]
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, ray.exceptions.RayTaskError) as error:
                # RayTaskError: the actor lives but its vLLM engine raised (e.g. EngineDeadError)
                restarts[index] += 1
                if restarts[index] > self.settings.max_restarts:
                    cause = getattr(error, "cause", None) or error
                    raise EngineFailedError(
                        f"{self.engine_name(index)} failed {restarts[index]} times on one batch "
                        f"(last: {type(cause).__name__}: {str(cause)[-2000:]}); giving up"
                    ) from None
                logger.warning("rollout fleet: %s failed (%s); restarting and retrying its %d prompts",
                               self.engine_name(index), type(error).__name__, len(requests[index]))
                self.restart(index)
                pending[index] = self.engines[index].generate.remote(requests[index], sampling)
        rollouts: list[list[Rollout]] = [[] for _ in prompts]
        for index, result in results.items():
            if result["version"] != expected:
                raise StaleWeightsError(
                    f"{result['engine']} answered from weight version {result['version']}, "
                    f"expected {expected} (the fleet is at {self.version})"
                )
            for prompt_index, samples in zip(shards[index], result["samples"]):
                rollouts[prompt_index] = [
                    Rollout(prompt_index, s["token_ids"], s["logprobs"], s["finish_reason"], result["version"],
                            s.get("routed_experts"))
                    for s in samples
                ]
        assert all(len(r) == n for r in rollouts), "every prompt gets exactly n rollouts"
        return rollouts

    def score(self, sequences: list[list[int]], engine: int = 0) -> list[list[float]]:
        result = ray.get(self.engines[engine].score.remote(sequences), timeout=self.settings.request_timeout_s)
        return result["logprobs"]

    def routed_experts(self, sequences: list[list[int]], engine: int = 0) -> list[np.ndarray]:
        """MoE models: teacher-forced expert ids [len, MoE layers, top_k] of each sequence."""
        result = ray.get(self.engines[engine].routed_experts.remote(sequences), timeout=self.settings.request_timeout_s)
        return result["routed"]

    def shutdown(self) -> None:
        self._links.clear()
        if self.buffers is not None:
            self.buffers.close()
        for engine in self.engines:
            if engine is not None:
                ray.kill(engine, no_restart=True)
        remove_placement_group(self.placement_group)


def _wait_until_gone(name: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return
        time.sleep(0.1)
    raise EngineFailedError(f"{name} did not exit within {timeout_s} s")


def connect_ray(temp_dir: str | os.PathLike | None = None, address: str | None = None, num_cpus: int | None = None) -> None:
    """Start (or join) Ray with its temp files and HOME inside the run directory."""
    if ray.is_initialized():
        return
    kwargs = dict(address=address, namespace=NAMESPACE, include_dashboard=False, log_to_driver=False,
                  runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    if address is None:
        kwargs.update(num_cpus=num_cpus, _temp_dir=str(temp_dir) if temp_dir else None)
    elif ":" in address and "://" not in address:
        # The raylet of *this* host, found by its address as the head sees it: Ray's own guess
        # takes any raylet it sees on this host (several on a test machine) or the head's.
        head, port = address.rsplit(":", 1)
        node_ip = transfer.local_address(head, int(port))
        if not node_ip.startswith("127."):  # a one-host job on loopback: Ray's own choice is right
            kwargs.update(_node_ip_address=node_ip)
    ray.init(**kwargs)


