"""The mixing buffer: a pure function of the step, every row at most once per epoch, the former in-RAM
order when everything fits, the same batches from a tensor and from a float32 store."""
import pytest
import torch

from aosae.data.mixing import MixingBuffer, RowRange, TensorSource
from aosae.data.store import StoreWriter


def rows_as_ids(n, d=3):
    """Row i = (i, i, ...): a batch's rows tell which source rows it drew."""
    return torch.arange(n, dtype=torch.float32)[:, None].expand(n, d).contiguous()


def test_single_group_is_the_former_in_ram_order():
    acts = torch.randn(1000, 4)
    buf = MixingBuffer(TensorSource(acts), 64, buffer_tokens=4096, seed=3)
    assert buf.n_groups == 1 and buf.steps_per_epoch == 15
    for step in (0, 7, 14, 15, 40):
        epoch, offset = step // 15, (step % 15) * 64
        perm = torch.randperm(1000, generator=torch.Generator().manual_seed(3 * 1_000_003 + epoch))
        assert torch.equal(buf.batch(step), acts[perm[offset : offset + 64]])


@pytest.mark.parametrize("n,buffer_tokens,batch", [(10_000, 1024, 100), (5_003, 640, 64), (777, 300, 7)])
def test_epoch_draws_each_row_at_most_once_and_mixes(n, buffer_tokens, batch):
    buf = MixingBuffer(TensorSource(rows_as_ids(n)), batch, buffer_tokens, seed=1)
    seen = torch.cat([buf.batch(s)[:, 0] for s in range(buf.steps_per_epoch)]).long()
    assert seen.unique().numel() == seen.numel()  # no repeats within an epoch
    assert n - seen.numel() < buf.n_groups * batch  # only each group's remainder is dropped
    first = buf.batch(0)[:, 0]
    assert first.max() - first.min() > n / 4  # rows from far apart in the source
    nxt = torch.cat([buf.batch(s)[:, 0] for s in range(buf.steps_per_epoch, 2 * buf.steps_per_epoch)])
    assert not torch.equal(seen.float(), nxt)  # a new order each epoch
    buf.close()


def test_position_is_a_pure_function_of_the_step():
    src = TensorSource(rows_as_ids(4000))
    a = MixingBuffer(src, 50, 512, seed=0)
    ref = [a.batch(s) for s in range(3 * a.steps_per_epoch)]
    for step in (0, 9, 10, 11, 57, a.steps_per_epoch, 2 * a.steps_per_epoch + 5):
        fresh = MixingBuffer(src, 50, 512, seed=0)  # a resumed run starts cold at `step`
        assert torch.equal(fresh.batch(step), ref[step])
        assert torch.equal(fresh.batch(step + 1), ref[step + 1])
        fresh.close()
    assert not torch.equal(MixingBuffer(src, 50, 512, seed=1).batch(0), ref[0])
    a.close()


def test_store_gives_the_batches_of_the_same_tensor(tmp_path):
    acts = torch.randn(3000, 6)
    writer = StoreWriter(tmp_path / "s", 6, "float32", {})
    writer.append(acts, 1)
    store = writer.finish()
    x = MixingBuffer(RowRange(store, 0, 2700), 64, 512, seed=2)
    y = MixingBuffer(TensorSource(acts[:2700]), 64, 512, seed=2)
    for step in range(0, 3 * x.steps_per_epoch, 5):
        assert torch.equal(x.batch(step), y.batch(step))
    x.close()
    y.close()


def test_sequential_source_is_read_in_order():
    class Seq(TensorSource):
        sequential = True

    buf = MixingBuffer(Seq(rows_as_ids(2000)), 10, 256, seed=0)
    assert buf.pieces(0, 2) == [(512, 768)] and buf.pieces(3, 7) == [(1792, 2000)]
    assert set(buf.batch(0)[:, 0].long().tolist()) <= set(range(256))


def test_bad_sizes():
    with pytest.raises(ValueError, match="larger than the activation buffer"):
        MixingBuffer(TensorSource(torch.zeros(10, 2)), 11, 100)
    with pytest.raises(ValueError, match="--buffer-tokens"):
        MixingBuffer(TensorSource(torch.zeros(100, 2)), 50, 40)
