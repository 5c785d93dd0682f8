"""Trainer-side weight push: TP/PP shards → HF tensors in bounded buckets on the driver."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_distributed
from tests.helpers import VOCAB, tiny_hf_model

BUCKET_BYTES = 200_000


def _collect(rank: int, world_size: int, layouts: list) -> dict:
    from sdpg_megatron.model.hf_mapping import load_hf_weights
    from sdpg_megatron.model.provider import model_provider, transformer_config
    from sdpg_megatron.parallel import padded_vocab_size
    from sdpg_megatron.parallel.groups import destroy_parallel, initialize_parallel
    from sdpg_megatron.rollout.buckets import hf_buckets
    from sdpg_megatron.rollout.shared_memory import BucketBuffers

    out = {}
    buffers = BucketBuffers("shm") if rank == 0 else None
    for tp, pp in layouts:
        groups = initialize_parallel(tensor_parallel=tp, pipeline_parallel=pp, seed=0)
        try:
            for tied in (True, False):
                arch, hf_model = tiny_hf_model(tied)
                state = hf_model.state_dict()
                config = transformer_config(arch, tensor_parallel=tp, pipeline_parallel=pp)
                model = model_provider(arch, config, pre_process=groups.is_first_stage, post_process=groups.is_last_stage)
                load_hf_weights(model, arch, state.__getitem__, padded_vocab=padded_vocab_size(VOCAB, tp),
                                tp_size=tp, tp_rank=groups.tp_rank, pp_size=pp, pp_rank=groups.pp_rank)
                # tied: the driver writes into shared buffers (packed stage 0, received later stages)
                allocate = None
                if tied and buffers is not None:
                    buffers.start_push()
                    allocate = buffers.next_buffer
                buckets = list(hf_buckets(model, arch, groups, bucket_bytes=BUCKET_BYTES, allocate=allocate))
                out[(tp, pp, tied)] = {
                    "tensors": {name: t.clone() for b in buckets for name, t in b.unpack()},
                    "bucket_bytes": [b.num_bytes for b in buckets],
                    "in_buffers": [buffers is not None and buffers.key_of(b.flat) is not None for b in buckets],
                }
                if allocate is not None:
                    buffers.finish_push(committed=True)
        finally:
            destroy_parallel()
    if buffers is not None:
        buffers.close()
    return out


@pytest.fixture(scope="module")
def collected():
    results = {}
    for world, layouts in ((2, [(2, 1), (1, 2), (1, 1)]), (4, [(2, 2)])):
        per_rank = run_distributed(_collect, world, layouts)
        for key in per_rank[0]:
            results[key] = [r[key] for r in per_rank]
    return results


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("layout", [(1, 1), (2, 1), (1, 2), (2, 2)], ids=["dp2", "tp2", "pp2", "tp2pp2"])
def test_driver_receives_exact_hf_weights_in_bounded_buckets(collected, layout, tied):
    reports = collected[(*layout, tied)]
    driver, others = reports[0], reports[1:]
    assert all(not r["tensors"] for r in others)  # only global rank 0 receives buckets
    _, hf_model = tiny_hf_model(tied)
    expected = {k: v for k, v in hf_model.state_dict().items() if not (tied and k == "lm_head.weight")}
    assert driver["tensors"].keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(driver["tensors"][name], tensor), name
    largest = max(t.numel() * t.element_size() for t in expected.values())
    assert max(driver["bucket_bytes"]) <= max(BUCKET_BYTES, largest)
    assert len(driver["bucket_bytes"]) > 3  # really bucketed
    assert all(driver["in_buffers"]) if tied else not any(driver["in_buffers"])


def test_truncated_bucket_is_rejected():
    from sdpg_megatron.rollout.buckets import WeightBucket

    bucket = WeightBucket.pack([("a", torch.ones(2, 3)), ("b", torch.zeros(4))])
    assert [n for n, _ in bucket.unpack()] == ["a", "b"]
    bucket.flat = bucket.flat[:-1]
    with pytest.raises(ValueError, match="truncated"):
        bucket.unpack()
