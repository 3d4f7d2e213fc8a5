"""The C++ row_topk (csrc/row_topk.cpp: the TopK step's selection on CPU in float32) against a
sort: the k best of each row of pre + bias, ties to the smaller column, NaN first, columns
ascending; its AVX-512 and portable paths alike, and tiled_topk through it."""
import pytest
import torch

from aosae.ops import extension
from aosae.ops.latent_selection import tiled_topk

module, why = extension.load()
# (CI fails on an unbuilt extension instead: tests/ops/test_gram_topk.py::test_extension_is_built_in_ci)
needs_kernel = pytest.mark.skipif(module is None, reason=f"aosae._C is not built: {why}")


def by_sort(pre, bias, k):
    """The k best per row by two stable sorts: by value (larger first; ties keep column order),
    then NaN before the rest. Columns ascending."""
    x = pre + bias if bias is not None else pre.clone()
    nan = torch.isnan(x)
    by_value = torch.sort(-torch.where(nan, 0.0, x), dim=1, stable=True).indices
    nan_first = torch.sort(-nan.gather(1, by_value).int(), dim=1, stable=True).indices
    cols = by_value.gather(1, nan_first)[:, :k].sort(1).values
    return x.gather(1, cols), cols


def rows_of(kind, b, n):
    if kind == "random":
        return torch.randn(b, n)
    if kind == "ties":
        return torch.randint(0, 4, (b, n)).float()
    if kind == "zeros":
        return torch.zeros(b, n)
    if kind == "nan":
        pre = torch.randn(b, n)
        pre[torch.rand(b, n) < 0.02] = float("nan")
        return pre
    if kind == "inf":
        pre = -torch.rand(b, n) * 1e30
        pre[:, ::7] = float("-inf")
        pre[:, 3::11] = float("inf")
        return pre
    if kind == "strided":  # rows of a wider buffer, as tiled_topk's last tile
        return torch.randn(b, n + 5)[:, 2 : n + 2]
    raise ValueError(kind)


PATHS = [pytest.param(False, id="avx512", marks=[needs_kernel, pytest.mark.skipif(
    module is not None and not module.row_topk_vectorized(), reason="this CPU has no AVX-512")]),
    pytest.param(True, id="portable", marks=needs_kernel)]


@pytest.mark.parametrize("kind", ["random", "ties", "zeros", "nan", "inf", "strided"])
@pytest.mark.parametrize("n", [1, 15, 17, 1024, 3000, 4133])
@pytest.mark.parametrize("scalar", PATHS)
def test_row_topk_keeps_the_k_best_in_column_order(seed, kind, n, scalar):
    b = 7 if n > 1024 else 37  # (more rows than one thread's share: the rows split across threads)
    pre = rows_of(kind, b, n)
    for k in sorted({1, min(n, 5), min(n, 64), (n + 1) // 2, n}):
        for bias in (None, torch.randn(n)):
            values, cols = module.row_topk(pre, bias, k, scalar)
            want_v, want_c = by_sort(pre, bias, k)
            assert cols.dtype == torch.long and values.shape == cols.shape == (b, k)
            assert torch.equal(cols, want_c), (k, bias is None)
            torch.testing.assert_close(values, want_v, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("scalar", PATHS)
def test_row_topk_keeps_negative_zero(scalar):
    """-0.0 comes back as -0.0 on both paths, with and without a bias (torch.topk keeps it too)."""
    pre = torch.full((2, 20), -0.0)
    values, cols = module.row_topk(pre, None, 20, scalar)
    assert torch.equal(cols[0], torch.arange(20)) and bool(torch.signbit(values).all())
    values, _ = module.row_topk(pre, torch.full((20,), -0.0), 3, scalar)
    assert bool(torch.signbit(values).all())


@needs_kernel
def test_row_topk_many_ties_past_the_bound(seed):
    """Rows whose bound lets far more than 4k values through (one value repeated): the candidates
    are cut to the k best on the way, the first k columns kept."""
    pre = torch.full((3, 20000), 2.0)
    pre[1, 5000:] = 3.0
    for scalar in (False, True):
        values, cols = module.row_topk(pre, None, 100, scalar)
        assert torch.equal(cols[0], torch.arange(100)) and torch.equal(cols[1], torch.arange(5000, 5100))
        assert (values[0] == 2).all() and (values[1] == 3).all()


@needs_kernel
def test_row_topk_rejects_what_it_cannot_read():
    pre = torch.randn(4, 9)
    with pytest.raises(RuntimeError, match="float32"):
        module.row_topk(pre.double(), None, 2)
    with pytest.raises(RuntimeError, match="k must be in"):
        module.row_topk(pre, None, 10)
    with pytest.raises(RuntimeError, match="k must be in"):
        module.row_topk(pre, None, 0)
    with pytest.raises(RuntimeError, match="bias must be"):
        module.row_topk(pre, torch.randn(8), 2)
    with pytest.raises(RuntimeError, match="columns must be contiguous"):
        module.row_topk(torch.randn(9, 4).t(), None, 2)


@pytest.mark.parametrize("tile", [3, 16, 40])
def test_tiled_topk_in_float32_matches_float64(seed, tile):
    """Through the kernel (float32): the latents of the float64 product's k best (ties broken to the
    smaller latent: columns 20–28 repeat 10–18), ascending."""
    centered = torch.randn(13, 6, dtype=torch.float64)
    W_enc, b_enc = torch.randn(6, 29, dtype=torch.float64), torch.randn(29, dtype=torch.float64)
    W_enc[:, 20:], b_enc[20:] = W_enc[:, 10:19], b_enc[10:19]
    centered, W_enc, b_enc = (t.float().double() for t in (centered, W_enc, b_enc))  # exact in float32
    for k in (1, 4, 12):
        values, indices = tiled_topk(centered.float(), W_enc.float(), b_enc.float(), k, tile)
        pre = torch.addmm(b_enc, centered, W_enc)
        want_v, want_i = by_sort(pre, None, k)
        gap = (pre.sort(1, descending=True).values[:, k - 1] - pre.sort(1, descending=True).values[:, k]).abs()
        clear = gap > 1e-4  # rows whose k-th and (k+1)-th differ by more than float32's rounding
        assert torch.equal(indices[clear], want_i[clear])
        assert (indices.diff(dim=1) > 0).all()
        torch.testing.assert_close(values.double(), pre.gather(1, indices), rtol=1e-5, atol=1e-5)


def test_tiled_topk_keeps_its_tile_between_calls_and_returns_no_view_of_it(seed, monkeypatch):
    """The step's product tile is kept per thread (a fresh one each step cost its page faults):
    the same buffer on the next call of that shape, a new one for another shape, and the values
    returned survive the next call."""
    from aosae.ops import latent_selection

    centered, W_enc, b_enc = torch.randn(9, 5), torch.randn(5, 40), torch.randn(40)
    first = tiled_topk(centered, W_enc, b_enc, 3, 16)
    kept = latent_selection.tile_buffer(9, 16, centered)
    assert latent_selection.tile_buffer(9, 16, centered) is kept
    held = first[0].clone()
    tiled_topk(torch.randn(9, 5), W_enc, b_enc, 3, 16)
    assert torch.equal(first[0], held)  # not overwritten through the kept tile
    assert latent_selection.tile_buffer(9, 16, centered) is kept
    assert latent_selection.tile_buffer(4, 16, centered) is not kept
    assert latent_selection.tile_buffer(4, 16, centered.double()).dtype == torch.float64
    kept = latent_selection.tile_buffer(4, 16, centered.double())
    latent_selection.release_tile_buffer()
    assert latent_selection.tile_buffer(4, 16, centered.double()) is not kept
    monkeypatch.setattr(latent_selection, "KEPT_TILE_BYTES", 4096)  # (the real cap: 2 GiB)
    big = latent_selection.KEPT_TILE_BYTES // 4 // 16 + 1  # rows: one past the largest kept tile
    assert latent_selection.tile_buffer(big, 16, centered) is not latent_selection.tile_buffer(big, 16, centered)
    latent_selection.release_tile_buffer()


def test_a_tile_kept_under_inference_mode_serves_training(seed):
    """An evaluation under torch.inference_mode at the training shape leaves a tile that the next
    training step can write (an inference tensor could not be written outside that mode)."""
    from aosae.ops import latent_selection
    from aosae.ops.sparse_coding import sparse_encode

    latent_selection.release_tile_buffer()
    x, W_enc, b_dec = torch.randn(6, 5), torch.randn(5, 30, requires_grad=True), torch.zeros(5)
    b_enc = torch.zeros(30, requires_grad=True)
    with torch.inference_mode():
        sparse_encode(x, W_enc, b_enc, b_dec, "topk", 4)
    sparse_encode(x, W_enc, b_enc, b_dec, "topk", 4).values.sum().backward()
    assert W_enc.grad is not None
    latent_selection.release_tile_buffer()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tiled_topk_in_half_precision(seed, dtype):
    """float16 and bfloat16 (addmm and torch.topk; no kernel): a top k of their own product, ascending."""
    centered, W_enc, b_enc = (t.to(dtype) for t in (torch.randn(8, 6), torch.randn(6, 40), torch.randn(40)))
    values, indices = tiled_topk(centered, W_enc, b_enc, 5, 16)
    assert values.dtype == dtype and (indices.diff(dim=1) > 0).all()
    pre = torch.addmm(b_enc.float(), centered.float(), W_enc.float())
    torch.testing.assert_close(values.float(), pre.gather(1, indices), rtol=2e-2, atol=2e-2)
    assert (values.float().min(1).values >= pre.topk(5, 1).values[:, -1] - 0.1).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiled_topk_without_the_kernel_agrees(seed, dtype):
    """kernel=False (addmm and torch.topk, the benchmark's baseline) keeps the same latents,
    ascending, on inputs without near-ties."""
    centered, W_enc, b_enc = torch.randn(6, 4, dtype=dtype), torch.randn(4, 50, dtype=dtype), torch.randn(50, dtype=dtype)
    for tile in (7, 50):
        a = tiled_topk(centered, W_enc, b_enc, 5, tile)
        b = tiled_topk(centered, W_enc, b_enc, 5, tile, kernel=False)
        assert (a[1].diff(dim=1) > 0).all() and (b[1].diff(dim=1) > 0).all()
        pre = torch.addmm(b_enc, centered, W_enc).sort(1, descending=True).values
        clear = (pre[:, 4] - pre[:, 5]).abs() > 1e-4
        assert torch.equal(a[1][clear], b[1][clear])
        torch.testing.assert_close(a[0][clear], b[0][clear], rtol=1e-5, atol=1e-5)
