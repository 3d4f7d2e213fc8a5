"""The batch's top B·k (BatchTopK's selection): exact whatever its sample says, a sample spread over
every latent, and no full top-k when a few latents fire in every row."""
import pytest
import torch

from aosae.ops import batch_top as bt


@pytest.mark.parametrize("total, count", [(10, 3), (5000, 1), (300_000, 4096), (300_000, 299_999), (7, 7)])
def test_batch_top_is_exact(seed, total, count, monkeypatch):
    flat = torch.randn(total)
    got = bt.batch_top(flat, count).sort().values
    assert torch.equal(got, flat.topk(count).indices.sort().values)
    monkeypatch.setattr(bt, "SCAN_CHUNK", 977)  # the candidates found chunk by chunk (a chunk dividing nothing here)
    assert torch.equal(bt.batch_top(flat, count).sort().values, got)
    monkeypatch.setattr(bt, "SAMPLE", 4)  # a useless sample: the full top-k takes over, still exact
    assert torch.equal(bt.batch_top(flat, count).sort().values, got)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 22])
def test_candidates_by_chunks_are_those_of_one_mask(seed, chunk, monkeypatch):
    flat = torch.randint(-3, 4, (1000,)).float()  # ties with the bound, and many entries at it
    monkeypatch.setattr(bt, "SCAN_CHUNK", chunk)
    for low in (-4.0, 0.0, 1.0, 3.0):
        want = (flat > low).nonzero().squeeze(1)
        assert torch.equal(bt.entries_above(flat, torch.tensor(low)), want)
        assert torch.equal(bt.entries_above(flat, low, limit=want.numel()), want)
        assert want.numel() == 0 or bt.entries_above(flat, low, limit=want.numel() - 1) is None
    assert bt.entries_above(flat[:0], 0.0).numel() == 0


@pytest.mark.parametrize("rows, width", [(2048, 16384), (2048, 65536), (512, 1 << 20), (4096, 24576), (3, 5)])
def test_the_batch_tops_sample_visits_every_latent(rows, width):
    """The strided sample of a [rows, width] batch takes every latent about equally often: a stride
    dividing the width (2048 × 16384 / 2¹⁸ = 128) took the same 128 latents of every row."""
    total = rows * width
    stride = bt.sample_stride(total)
    assert abs(stride - max(1, total // bt.SAMPLE)) <= 8
    cols = torch.bincount(torch.arange(0, total, stride) % width, minlength=width)
    assert int(cols.max()) - int(cols.min()) <= 1


def test_the_batch_top_finds_its_bound_when_a_few_latents_fire_in_every_row(seed, monkeypatch):
    """Every 256th latent of every row far above the rest: the sample still bounds the batch's top
    from below without the full top-k (which a stride of 256 here ran), and the result is exact."""
    monkeypatch.setattr(bt, "SAMPLE", 64)
    pre = torch.randn(64, 256)
    pre[:, ::256] += 50.0
    flat = pre.reshape(-1)
    full = []
    monkeypatch.setattr(bt, "_full_top", lambda f, c: full.append(c) or f.topk(c, sorted=False).indices)
    got = bt.batch_top(flat, 4 * 64).sort().values
    assert torch.equal(got, flat.topk(4 * 64).indices.sort().values)
    assert full == []
