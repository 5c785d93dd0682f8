"""Same-node bucket buffers: written once by the trainer, read in place by the engines."""

from __future__ import annotations

import os

import pytest
import torch

from sdpg_megatron.rollout.shared_memory import BucketBuffers, OpenedBuckets


@pytest.fixture
def buffers(tmp_path):
    buffers = BucketBuffers("shm", root=tmp_path)
    yield buffers
    buffers.close()


def _push(buffers: BucketBuffers, sizes: list[int], value: float, *, commit: bool = True) -> list[torch.Tensor]:
    buffers.start_push()
    flats = [buffers.next_buffer(n, torch.float32).fill_(value) for n in sizes]
    buffers.finish_push(committed=commit)
    return flats


def test_a_worker_reads_the_trainers_bytes_in_place(buffers):
    (flat,) = _push(buffers, [1000], 0.0)
    flat.copy_(torch.arange(1000, dtype=torch.float32))
    opened = OpenedBuckets()
    view = opened.open(buffers.describe(buffers.key_of(flat)))
    assert torch.equal(view, flat)
    flat[7] = -1.0  # the same memory, not a copy
    assert view[7].item() == -1.0
    assert opened.open(buffers.describe(buffers.key_of(flat))) is view  # mapped once


def test_pushes_alternate_between_two_sets_and_reuse_their_buffers(buffers):
    first = _push(buffers, [10, 20], 1.0)
    second = _push(buffers, [10, 20], 2.0)
    third = _push(buffers, [10, 20], 3.0)
    assert all(a is c for a, c in zip(first, third))  # the same buffers: no new pages
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(first, second))
    assert all(torch.all(b == 2.0) for b in second)  # the committed push before it, untouched
    assert len(list(buffers.directory.iterdir())) == 4


def test_a_failed_push_leaves_the_committed_set_whole(buffers):
    committed = _push(buffers, [10, 20], 1.0)
    _push(buffers, [10, 20], 9.0, commit=False)  # dies half-way (or writes garbage)
    assert all(torch.all(c == 1.0) for c in committed)
    late = buffers.next_buffer(10, torch.float32).fill_(8.0)  # the failed push's producer drains on
    assert all(torch.all(c == 1.0) for c in committed) and buffers.key_of(late)[0] != buffers.committed
    retry = _push(buffers, [10, 20], 2.0)  # goes into the same set the failed one used
    assert all(torch.all(c == 1.0) for c in committed)
    assert buffers.committed == buffers.key_of(retry[0])[0] != buffers.key_of(committed[0])[0]


def test_a_resized_bucket_gets_a_new_buffer_and_open_views_follow(buffers):
    (small,) = _push(buffers, [10], 1.0)
    _push(buffers, [10], 2.0)
    opened = OpenedBuckets()
    assert opened.open(buffers.describe(buffers.key_of(small))).numel() == 10
    (large,) = _push(buffers, [30], 3.0)  # same set and index as `small`, new size
    view = opened.open(buffers.describe(buffers.key_of(large)))
    assert view.numel() == 30 and torch.all(view == 3.0)
    assert buffers.key_of(small) is None


def test_a_worker_on_another_host_is_told_so(buffers):
    (flat,) = _push(buffers, [10], 1.0)
    description = buffers.describe(buffers.key_of(flat))
    os.unlink(description["path"])  # what a worker on another host sees: no such file
    with pytest.raises(ValueError, match="needs the engines on the trainer's host"):
        OpenedBuckets().open(description)


def test_writing_without_a_push_and_unknown_kinds_are_refused(tmp_path):
    with pytest.raises(ValueError, match="one of"):
        BucketBuffers("tcp", root=tmp_path)
    buffers = BucketBuffers("shm", root=tmp_path)
    with pytest.raises(RuntimeError, match="start_push"):
        buffers.next_buffer(4, torch.float32)
    buffers.close()
    assert not buffers.directory.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_ipc_without_cuda_is_refused(tmp_path):
    with pytest.raises(ValueError, match="cuda_ipc needs a CUDA device"):
        BucketBuffers("cuda_ipc", root=tmp_path)
