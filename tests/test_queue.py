"""The FIFO queue: wrap-around, alignment of fields, validity, checkpoint round trip."""
import pytest
import torch

from mls.method.queue import FeatureQueue


def make_queue(size=10):
    return FeatureQueue(size, {"g": ((3,), torch.float32), "z": ((2,), torch.float32), "index": ((), torch.long)})


def batch(ids):
    ids = torch.tensor(ids)
    return {"g": ids[:, None].float().repeat(1, 3), "z": -ids[:, None].float().repeat(1, 2), "index": ids}


def test_wrap_around_keeps_fifo_order_and_alignment():
    queue, ring, written = make_queue(10), [None] * 10, 0
    for start in range(0, 4 * 7, 4):  # 7 pushes of 4: the batch does not divide the size
        ids = list(range(start, start + 4))
        queue.push(**batch(ids))
        for i in ids:  # what a FIFO of 10 slots holds, written by hand
            ring[written % 10] = i
            written += 1
        assert queue["index"].tolist() == [r if r is not None else 0 for r in ring]
    assert torch.equal(queue["g"][:, 0].long(), queue["index"])
    assert torch.equal(-queue["z"][:, 1].long(), queue["index"])
    assert int(queue.ptr) == 28 % 10


def test_valid_mask_grows_then_stays_full():
    queue = make_queue(10)
    assert queue.valid.sum() == 0
    queue.push(**batch([1, 2, 3, 4]))
    assert queue.valid.tolist() == [True] * 4 + [False] * 6
    assert int(queue.count) == 4 and not bool(queue.full)
    queue.push(**batch(list(range(5, 13))))
    assert queue.valid.all()


def test_batch_larger_than_queue_keeps_its_newest_rows():
    queue = make_queue(4)
    queue.push(**batch(list(range(6))))
    assert sorted(queue["index"].tolist()) == [2, 3, 4, 5]
    queue.push(**batch([6]))
    assert sorted(queue["index"].tolist()) == [3, 4, 5, 6]


def test_push_needs_every_field():
    with pytest.raises(ValueError, match="fields"):
        make_queue().push(g=torch.zeros(1, 3), z=torch.zeros(1, 2))


def test_state_dict_round_trip(tmp_path):
    queue = make_queue(10)
    queue.push(**batch(list(range(13))))
    torch.save(queue.state_dict(), tmp_path / "q.pt")
    restored = make_queue(10)
    restored.load_state_dict(torch.load(tmp_path / "q.pt"))
    for name in ("g", "z", "index"):
        assert torch.equal(restored[name], queue[name])
    assert int(restored.count) == 10
    oldest = int((restored["index"] == 3).nonzero())
    restored.push(**batch([99]))  # the restored pointer overwrites the oldest entry, 3
    assert int(restored["index"][oldest]) == 99
    assert sorted(restored["index"].tolist()) == list(range(4, 13)) + [99]
