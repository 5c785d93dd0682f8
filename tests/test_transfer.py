"""The trainer↔engine weight group (sdpg_megatron/rollout/transfer.py) without vLLM: two ends
in one process meet at the trainer's store and broadcast a bucket over gloo, each end's
device bound to the address from which it reaches the store (on two hosts the tests'
two-node Slurm covers it: tests/test_slurm_multinode.py)."""

from __future__ import annotations

import threading

import torch

from sdpg_megatron.rollout import transfer


def test_local_address_is_the_source_address_towards_the_host():
    assert transfer.local_address("127.0.0.1", 9) == "127.0.0.1"
    assert transfer.local_address("localhost", 9).startswith("127.")


def test_gloo_weight_group_broadcasts_a_bucket_from_the_trainer():
    address, store = transfer.listen(2, "gloo", timeout_s=60)
    bucket = transfer.WeightBucket.pack([("a", torch.arange(6.0).view(2, 3)), ("b", torch.ones(4))])
    received = {}

    def engine_worker():
        group = transfer.open_group(address, 1)
        flat = torch.empty(bucket.flat.numel(), dtype=bucket.dtype)
        transfer.broadcast(group, flat).wait()
        received["bucket"] = transfer.WeightBucket(bucket.names, bucket.shapes, bucket.dtype, flat)

    worker = threading.Thread(target=engine_worker)
    worker.start()
    transfer.broadcast(transfer.open_group(address, 0, store), bucket.flat).wait()
    worker.join(timeout=60)

    assert [(name, tensor.tolist()) for name, tensor in received["bucket"].unpack()] == \
        [(name, tensor.tolist()) for name, tensor in bucket.unpack()]
