"""coactive_topk_sum, the sum of the k best co-active pairs without their list (C++, CPU, dot):
equal to the sum over coactive_topk's selection, value and gradient, for any k (below, at and
above the number of co-active pairs), with ties, zeros, negative values, dense rows through the
GEMM block (both products of its backward), every dtype; the loss takes it when its closed form
declines; the dense-row plan skips a row too wide for the block instead of giving up."""
from __future__ import annotations

import numpy
import pytest
import torch

from aosae.nn.loss import TopKOrthoLoss
from aosae.ops import coactive_topk as co
from aosae.ops.coactive_sum import coactive_topk_sum
from aosae.ops.coactive_topk import coactive_topk
from aosae.ops.gram_topk import kth_score
from test_coactive_topk import assert_block_taken, cpp_module, outlier_rows, ragged_rows

BIG_K = 10**12


@pytest.fixture(autouse=True)
def _fresh_inputs(seed):
    """Every test draws fresh random inputs (conftest's `seed` reseeds torch and prints it)."""
    cpp_module()  # skips without the extension


def selection_sum(offsets, indices, values, n, k):
    """Σ |C_ij| over the op's selection, its gradient w.r.t. values, and the pairs."""
    v = values.detach().clone().requires_grad_()
    pairs = coactive_topk(offsets, indices, v, n, k, ordered=False)
    total = pairs.values.abs().sum()
    total.backward()
    return total.detach(), v.grad, pairs


def summed(offsets, indices, values, n, k):
    v = values.detach().clone().requires_grad_()
    found = coactive_topk_sum(offsets, indices, v, n, k)
    assert found is not None
    found.total.backward()
    return found, v.grad


def backward_from_plan(module, c, k, forward=None, **kwargs):
    """The kernel's backward handed the forward's plan (keep_plan=True) instead of deriving it.
    forward: the forward's other keyword arguments."""
    u = c.uniq.numel()
    total, kth, tie_cut, kept, in_block, width, live_end, _, plan = module.sparse_csr_topk_sum(
        c.row_ptr, c.cols, c.vals, u, k, keep_plan=True, **(forward or {}))
    lengths = c.row_ptr[1:] - c.row_ptr[:-1]
    row_pairs = int((lengths * (lengths - 1) // 2).sum())
    assert plan.pair_runs.numel() == c.cols.numel()
    if plan.kept_bits is None:  # every row pair's score (the full path)
        assert 0 < plan.pair_scores.numel() <= row_pairs
    else:  # a kept bit per row pair (the bracketed sum: each latent's bits from a word boundary)
        assert plan.pair_scores is None and plan.kept_bits.numel() * 64 >= row_pairs
    return module.sparse_csr_topk_sum_backward(1.0, c.row_ptr, c.cols, c.vals, u, float(kth), tie_cut, width,
                                               live_end=live_end, plan=plan, **kwargs)


def assert_is_the_selections(c, k, dtype, total, kth, grad) -> float:
    """The kernel's total, k-th score and gradient on canonical rows c are the selection's; returns
    the tolerance it used."""
    want_total, want_grad, selection = selection_sum(c.row_ptr, c.cols, c.vals, c.uniq.numel(), k)
    assert float(kth) == float(kth_score(selection.values.detach(), k))
    eps = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(total, want_total.double(), rtol=eps, atol=eps)
    torch.testing.assert_close(grad, want_grad, rtol=eps, atol=eps * max(1.0, float(want_grad.abs().max())))
    return eps


def rows_of(kind, dtype, *, integer=False, signed=False, zeros=0.0):
    if kind == "ragged":
        offsets, indices, values, _ = ragged_rows(int(torch.randint(20, 60, ())), 97, 11, dtype=dtype,
                                                  integer=integer, signed=signed, zeros=zeros)
        return offsets, indices, values, 97
    if kind == "outliers":  # a few long rows: the GEMM block, forward and backward
        offsets, indices, values, _, n = outlier_rows(dtype, integer=integer, signed=signed, zeros=zeros)
        assert_block_taken(offsets, indices, values)
        return offsets, indices, values, n
    B, L, n = int(torch.randint(5, 40, ())), 7, 301
    indices = torch.stack([torch.randperm(n)[:L] for _ in range(B)]).flatten()
    values = torch.randint(1, 4, (B * L,)).double() if integer else torch.rand(B * L, dtype=torch.float64) + 0.05
    return torch.arange(B + 1) * L, indices, values.to(dtype), n


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["ragged", "outliers", "topk"])
@pytest.mark.parametrize("values", ["random", "ties", "signed_with_zeros"])
def test_equals_the_selections_sum_and_gradient_at_every_k(dtype, kind, values):
    offsets, indices, vals, n = rows_of(kind, dtype, integer=values == "ties", signed=values != "random",
                                        zeros=0.2 if values != "random" else 0.0)
    pairs = coactive_topk(offsets, indices, vals, n, BIG_K).values.numel()
    assert pairs > 3
    for k in sorted({1, 2, int(torch.randint(1, pairs, ())), pairs // 2, pairs - 1, pairs, pairs + 1, BIG_K}):
        found, grad = summed(offsets, indices, vals, n, k)
        want, want_grad, selection = selection_sum(offsets, indices, vals, n, k)
        assert found.kept == selection.values.numel() == min(k, pairs)
        assert found.total.dtype == want.dtype
        # the kth it reports is the selection's (0 when every pair is kept), exactly
        assert found.kth == float(kth_score(selection.values.detach(), k))
        # float32: the selection sums its float32 values in float32, this sum in float64
        eps = 1e-12 if dtype == torch.float64 else 2e-5
        torch.testing.assert_close(found.total, want, rtol=eps, atol=eps)
        torch.testing.assert_close(grad, want_grad, rtol=eps, atol=eps * max(1.0, float(want_grad.abs().max())))


def long_rows(dtype, signed: bool, integer: bool):
    """Rows of 20–120 latents (runs longer than a register, below the block's row length), integer
    values (ties at the k-th score) or not, signed or not."""
    B, n = 24, 400
    lengths = torch.randint(20, 121, (B,))
    indices = torch.cat([torch.randperm(n)[:L] for L in lengths.tolist()])
    count = int(lengths.sum())
    values = torch.randint(1, 4, (count,)).double() if integer else torch.rand(count, dtype=torch.float64) + 0.05
    if signed:
        values = values * torch.randint(0, 2, values.shape).mul(2).sub(1)
    return torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]), indices, values.to(dtype), n


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["ragged", "outliers", "topk", "long", "long_signed"])
@pytest.mark.parametrize("values", ["ties", "random"])
def test_the_portable_and_vectorised_row_products_give_the_same_bits(dtype, kind, values):
    """The rows' products by the AVX-512 path (scores turned into gradients in the registers,
    ties at the k-th score by their keys) and by the portable one, which a machine without AVX-512
    takes: the selection's gradient, bit for bit the same on both paths (non-integer values and
    upstream gradient: a different order or rounding of the sums shows), from the plan and
    derived again."""
    module = cpp_module()
    integer = values == "ties"
    if kind.startswith("long"):
        offsets, indices, vals, n = long_rows(dtype, signed=kind == "long_signed", integer=integer)
    else:
        offsets, indices, vals, n = rows_of(kind, dtype, integer=integer, signed=True, zeros=0.2)
    c = co.canonical(offsets, indices, vals)
    u = c.uniq.numel()
    pairs = coactive_topk(offsets, indices, vals, n, BIG_K).values.numel()
    eps = 1e-12 if dtype == torch.float64 else 2e-5
    upstream = 1.0 if integer else 0.731
    cuts = []
    for k in sorted({1, pairs // 3, pairs // 2, pairs - 1, pairs + 1}):
        total, kth, tie_cut, kept, in_block, width, live_end, _, plan = module.sparse_csr_topk_sum(
            c.row_ptr, c.cols, c.vals, u, k, keep_plan=True)
        cuts.append(tie_cut)
        _, want_grad, _ = selection_sum(c.row_ptr, c.cols, c.vals, u, k)
        want_grad = want_grad * upstream
        grads = [module.sparse_csr_topk_sum_backward(upstream, c.row_ptr, c.cols, c.vals, u, float(kth), tie_cut,
                                                     width, live_end=live_end, plan=given, vectorised=vectorised)
                 for vectorised in (True, False) for given in (plan, None)]
        torch.testing.assert_close(grads[0], want_grad.to(grads[0].dtype), rtol=eps,
                                   atol=eps * max(1.0, float(want_grad.abs().max())))
        for other in grads[1:]:
            assert torch.equal(other, grads[0])
    if integer:
        assert any(0 <= cut < 2**63 - 1 for cut in cuts)  # some k cut among pairs tied at the k-th score
    if not module.cpu_has_avx512():
        pytest.skip("no AVX-512 here: vectorised=True took the portable path too")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_more_latents_than_uint16_ids_sum_with_wider_ids(dtype):
    """Past 65536 active latents the summing loop reads the cols as int32 (float: its sixteen-lane
    passes) or int64 (double), uint16 below: the selection's sum and gradient on both sides of the
    line, float32 against the float64 selection."""
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for u in (65536, 65537, 65538 + int(torch.randint(0, 3000, ()))):
        perm = torch.randperm(u)
        lengths = torch.full((u // 2 + 1,), 2)
        lengths[-1] = u - 2 * (u // 2)  # (0 or 1: every latent in exactly one row)
        indices = torch.cat([perm, perm[: int(torch.randint(1000, 4000, ()))]])  # a few latents twice more
        extra = indices.numel() - u
        lengths = torch.cat([lengths, torch.full((extra // 3,), 3), torch.full((extra % 3,), 1)])
        lengths = lengths[lengths > 0]
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        # multiples of 1/1024 in [0.1, 1.1): every product and pair sum exact in float32 too, so the same pairs are kept
        values = torch.randint(103, 1127, (indices.numel(),), dtype=torch.float64) / 1024
        c = co.canonical(offsets, indices, values)
        assert c.uniq.numel() == u
        pairs = coactive_topk(offsets, indices, values, u, BIG_K).values.numel()
        for k in (pairs // 4, pairs + 1):
            found, grad = summed(offsets, indices, values.to(dtype), u, k)
            want, want_grad, _ = selection_sum(offsets, indices, values.to(dtype).double(), u, k)
            torch.testing.assert_close(found.total.double(), want, rtol=tol, atol=tol)
            torch.testing.assert_close(grad.double(), want_grad, rtol=tol, atol=tol * float(want_grad.abs().max()))


@pytest.mark.parametrize("wide_ids", [False, True])
def test_float32_sums_as_float64_does_on_integers(wide_ids):
    """The float32 summing loop (sixteen pairs at a time where the CPU has AVX-512) against the
    float64 one (one pair at a time) on small integers, where both are exact: the same total, k-th
    score and gradient, bit for bit. Runs of 20–60 partners (several registers), pairs that cancel
    to exactly 0 and are touched again (listed twice), and ids past uint16's (int32 in float32)."""
    n = 70000 if wide_ids else 3000
    perm = torch.randperm(n)
    lengths = torch.randint(20, 61, (n // 20,))
    lengths = lengths[: int((lengths.cumsum(0) <= n).sum())]
    rows = list(torch.split(perm[: int(lengths.sum())], lengths.tolist()))
    values = [torch.randint(1, 4, (r.numel(),)).double() * torch.randint(0, 2, (r.numel(),)).mul(2).sub(1) for r in rows]
    for t in torch.randperm(len(rows))[:40].tolist():  # the row again, its second half negated (cross pairs: 0), then once more
        half = rows[t].numel() // 2
        rows += [rows[t], rows[t]]
        values += [torch.cat([values[t][:half], -values[t][half:]]), values[t].clone()]
    indices, vals = torch.cat(rows), torch.cat(values)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.tensor([r.numel() for r in rows]).cumsum(0)])
    c = co.canonical(offsets, indices, vals)
    assert (c.uniq.numel() > 65536) == wide_ids
    row_pairs = int(sum(r.numel() * (r.numel() - 1) // 2 for r in rows))
    for k in (row_pairs // 5, row_pairs // 2):
        found64, grad64 = summed(offsets, indices, vals, n, k)
        found32, grad32 = summed(offsets, indices, vals.float(), n, k)
        assert float(found32.total) == float(found64.total) and found32.kth == found64.kth
        assert torch.equal(grad32.double(), grad64)


@pytest.mark.parametrize("product", ["sparse", "dense"])
def test_both_products_of_the_block_give_the_selections_gradient(product):
    """The moved rows' gradient A_H · G_U, per kept pair or as one GEMM, whichever the cost model
    would pick: both equal the selection's (float64)."""
    module = cpp_module()
    offsets, indices, values, n = rows_of("outliers", torch.float64, signed=True)
    c = co.canonical(offsets, indices, values)
    u = c.uniq.numel()
    pairs = coactive_topk(offsets, indices, values, n, BIG_K).values.numel()
    for k in (pairs // 50, pairs // 2, pairs - 1):
        total, kth, tie_cut, kept, in_block, width, live_end, *_ = module.sparse_csr_topk_sum(c.row_ptr, c.cols,
                                                                                             c.vals, u, k)
        assert width >= 2 and 0 < in_block <= kept == k
        grad = module.sparse_csr_topk_sum_backward(1.0, c.row_ptr, c.cols, c.vals, u, float(kth), tie_cut, width,
                                                   product=product, live_end=live_end)
        want_total, want_grad, _ = selection_sum(c.row_ptr, c.cols, c.vals, u, k)
        torch.testing.assert_close(total, want_total, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-12 * float(want_grad.abs().max()))
        # again, without the forward's count of kept pairs in the block: counted here
        counted = module.sparse_csr_topk_sum_backward(1.0, c.row_ptr, c.cols, c.vals, u, float(kth), tie_cut, width,
                                                      live_end=live_end)
        torch.testing.assert_close(counted, want_grad, rtol=1e-12, atol=1e-12 * float(want_grad.abs().max()))
        # the forward's plan read instead of derived again: the same gradient, bit for bit
        assert torch.equal(backward_from_plan(module, c, k, product=product), grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("values", ["random", "ties", "sparse", "zeros"])
def test_block_tiles_skip_the_moved_rows_a_tile_holds_no_latent_of(dtype, values):
    """With no negative value, a tile of the recomputed block adds only the moved rows in which one
    of its block rows has a non-zero coefficient (csrc/block_product.h, live_rows; the backward's
    column products likewise, csrc/tile_products.h): the others' terms are exact zeros. The stored
    block (the selection's) adds them all: the same scores bit for bit, so the same k-th score, tie
    cut and kept set, and the total and gradient are the selection's. The backward's row dots leave
    unsummed the outputs no entry reads: "sparse" has eight dense moved rows and three sparse ones
    (a block of eight moved rows of their own, whose coefficients are mostly all 0); "zeros" puts
    zero values in a sparse ninth, whose latents have an entry but a zero coefficient: then every
    output is summed (RecomputedBlock::entries_nonzero). The gradient from the kept bits and from
    recomputed tiles, bit for bit."""
    # moved rows that hold the block's latents unevenly, as BatchTopK's first steps at d_sae 262144
    # do (a token with 95 % of them, others with a few per cent); no negative value
    dense = [1150 - 50 * x for x in range(8)]
    lengths, pool = {"sparse": (dense + [300, 200, 150], 1200), "zeros": (dense + [300], 1200)}.get(
        values, ([380, 300, 200, 150, 140, 130, 130], 400))
    long_zeros = [0.0] * 8 + [0.5] if values == "zeros" else None
    offsets, indices, vals, _, n = outlier_rows(dtype, integer=values == "ties", signed=False, long_l0=lengths,
                                                pool=pool, long_zeros=long_zeros)
    assert_block_taken(offsets, indices, vals)
    c = co.canonical(offsets, indices, vals)
    u = c.uniq.numel()
    pairs = coactive_topk(c.row_ptr, c.cols, c.vals, u, BIG_K).values.numel()
    module = cpp_module()
    for k in sorted({1, pairs // 50, pairs // 3, pairs // 2, pairs - 1}):
        total, kth, tie_cut, kept, in_block, width, live_end, _, plan = module.sparse_csr_topk_sum(
            c.row_ptr, c.cols, c.vals, u, k, keep_plan=True)
        assert width > 0 and in_block > 0
        from_plan, recomputed = (module.sparse_csr_topk_sum_backward(
            1.0, c.row_ptr, c.cols, c.vals, u, float(kth), tie_cut, width, product="dense", live_end=live_end,
            plan=given) for given in (plan, None))
        assert_is_the_selections(c, k, dtype, total, kth, from_plan)  # (the k-th score exactly: the same bits)
        assert torch.equal(from_plan, recomputed)


@pytest.mark.parametrize("values", ["random", "ties", "zeros"])
def test_the_blocks_kept_bits_give_the_recomputed_gradient(values):
    """Float32 rows with no negative value and a block: the forward keeps the block's kept pairs as
    bits (csrc/block_bits.h) and the backward reads them instead of recomputing the block's scores.
    Its gradient is the recomputed one bit for bit (ties at the k-th score cut inside the block by
    their keys; zeros, where no norm order prunes the block; every pair kept) and the selection's."""
    module = cpp_module()
    if values == "zeros" and not module.cpu_has_avx512_bw_vl():
        pytest.skip("rows with zeros take a block only where the bracketed sum runs (AVX-512 BW/VL)")
    offsets, indices, vals, n = rows_of("outliers", torch.float32, integer=values == "ties", signed=False,
                                        zeros=0.2 if values == "zeros" else 0.0)
    c = co.canonical(offsets, indices, vals)
    u = c.uniq.numel()
    every = coactive_topk(c.row_ptr, c.cols, c.vals, u, BIG_K)
    pairs = every.values.numel()
    in_u = torch.zeros(u, dtype=torch.bool)  # the block's latents
    for t in module.sparse_dense_rows(c.row_ptr, c.cols, c.vals, u, recomputed=True).tolist():
        in_u[c.cols[c.row_ptr[t]:c.row_ptr[t + 1]]] = True
    split_in_block = False
    for k in sorted({1, pairs // 50, pairs // 3, pairs // 2, pairs - 1, pairs, pairs + 1}):
        _, want_grad, _ = selection_sum(c.row_ptr, c.cols, c.vals, u, k)
        # the exact histogram's pass; a missed bracket (a step past the block), then the histogram;
        # a wide bracket from every third row (test_the_sampled_bracket_finds_the_exact_kth_...)
        for forward in ({}, {"bracket": 1e-9, "sample_step": 10**6}, {"bracket": 0.5, "sample_step": 3}):
            total, kth, tie_cut, kept, in_block, width, live_end, _, plan = module.sparse_csr_topk_sum(
                c.row_ptr, c.cols, c.vals, u, k, keep_plan=True, **forward)
            assert width > 0 and plan.block_bits is not None
            tied = every.values.abs() == kth
            kept_tied = k - int((every.values.abs() > kth).sum())
            if kth > 0 and 0 < kept_tied < int(tied.sum()):  # the cut splits the pairs tied at the k-th score,
                split_in_block |= bool((tied & in_u[every.rows] & in_u[every.cols]).any())  # some inside U × U
            from_bits, recomputed = (module.sparse_csr_topk_sum_backward(
                0.731, c.row_ptr, c.cols, c.vals, u, float(kth), tie_cut, width, product="dense", live_end=live_end,
                plan=given) for given in (plan, None))
            assert torch.equal(from_bits, recomputed)
            torch.testing.assert_close(from_bits, want_grad * 0.731, rtol=2e-5,
                                       atol=2e-5 * float(want_grad.abs().max()))
    assert split_in_block or values != "ties"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_block_rows_all_kept_none_kept_and_cut_across_tiles(dtype):
    """A block wider than the backward's tiles (256 columns) whose kept pairs fill some rows' whole
    stretch of a tile, miss others and cut through the rest: the backward takes each kind its own
    way (every pair kept: A_H's prefix sums and a difference array; none: skipped; cut: the tile's
    products), and gives the selection's gradient; from the kept bits (float32) the same bits as
    from the recomputed scores, which classify the rows alike."""
    module = cpp_module()
    offsets, indices, values, _, _ = outlier_rows(dtype, signed=False, long_rows=3, long_l0=600, pool=700)
    assert_block_taken(offsets, indices, values)
    c = co.canonical(offsets, indices, values)
    u = c.uniq.numel()
    pairs = coactive_topk(c.row_ptr, c.cols, c.vals, u, BIG_K).values.numel()
    kinds = set()  # of the rows of tiles past each panel's first (float32: read from the kept bits)
    # (without pairs - 1, 8 draws in 100 had no row kept whole; with it none in 400)
    for k in (pairs // 20, pairs // 4, pairs // 2, 9 * pairs // 10, pairs - 1):
        _, want_grad, _ = selection_sum(c.row_ptr, c.cols, c.vals, u, k)
        total, kth, tie_cut, kept, in_block, width, live_end, _, plan = module.sparse_csr_topk_sum(
            c.row_ptr, c.cols, c.vals, u, k, keep_plan=True)
        assert width > 256 and int(live_end[0]) > 256  # (the block's first row spans two tiles)
        assert (plan.block_bits is not None) == (dtype == torch.float32)
        if plan.block_bits is not None:
            kinds |= tile_row_kinds(plan.block_bits, live_end)
        from_plan, recomputed = (module.sparse_csr_topk_sum_backward(
            0.731, c.row_ptr, c.cols, c.vals, u, float(kth), tie_cut, width, product="dense", live_end=live_end,
            plan=given) for given in (plan, None))
        assert torch.equal(from_plan, recomputed)
        tol = 2e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(from_plan, want_grad * 0.731, rtol=tol, atol=tol * float(want_grad.abs().max()))
    assert dtype == torch.float64 or kinds == {"none", "all", "cut"}


def tile_row_kinds(words, live_end, tile_rows=16, tile_cols=256):
    """How the backward's tiles past each panel's first see their rows' spans, from the forward's
    kept bits (csrc/block_bits.h: row p's pairs (p, q < live_end[p]) from word Σ_{p' < p}
    ⌈(live_end[p'] − p' − 1) / 16⌉, bit x = pair (p, p + 1 + x)): kept "none", "all" or "cut"."""
    ends = live_end.tolist()
    extent = ends[0]
    bits = torch.from_numpy(numpy.unpackbits(words.numpy().view(numpy.uint8), bitorder="little"))
    start, kinds = [0], set()
    for p in range(extent):
        start.append(start[-1] + 16 * ((max(0, ends[p] - p - 1) + 15) // 16))
    for p0 in range(0, extent, tile_rows):
        p1 = min(extent, p0 + tile_rows)
        end = max(ends[p0], p1)
        for q0 in range(p0 + 1 + tile_cols, end, tile_cols):
            q1 = min(end, q0 + tile_cols)
            for p in range(p0, p1):
                lo = min(max(p + 1, q0), q1)
                hi = min(max(ends[p], lo), q1)
                if hi > lo:
                    kept = int(bits[start[p] + lo - p - 1:start[p] + hi - p - 1].sum())
                    kinds.add("none" if kept == 0 else "all" if kept == hi - lo else "cut")
    return kinds


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("one_row_on_all", [True, False])
def test_every_coactive_pair_kept_takes_the_closed_form_and_equals_the_tiles(dtype, one_row_on_all):
    """Positive values and k above the co-active pairs: every co-active pair of the block is kept,
    and the moved rows' gradient is g·(A_H's row sums − A_H) (the pairs that never co-fire, none
    when one token is on every latent of the block and a few otherwise, never meet in a moved
    row). It equals the tiles' and the selection's."""
    module = cpp_module()
    offsets, indices, values, _, n = outlier_rows(dtype, signed=False)
    if one_row_on_all:
        rows = [indices[int(a):int(b)] for a, b in zip(offsets[:-1], offsets[1:])]
        vals = [values[int(a):int(b)] for a, b in zip(offsets[:-1], offsets[1:])]
        everything = torch.unique(indices)
        at = int(torch.randint(0, len(rows) + 1, ()))
        rows.insert(at, everything)
        vals.insert(at, (torch.rand(everything.numel(), dtype=torch.float64) + 0.05).to(dtype))
        lengths = torch.tensor([r.numel() for r in rows])
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])
        indices, values = torch.cat(rows), torch.cat(vals)
    c = co.canonical(offsets, indices, values)
    u = c.uniq.numel()
    total, kth, tie_cut, kept, in_block, width, live_end, *_ = module.sparse_csr_topk_sum(c.row_ptr, c.cols, c.vals, u,
                                                                                         BIG_K)
    assert float(kth) == 0 and tie_cut == -1 and width > 0
    assert (2 * in_block == width * (width - 1)) == one_row_on_all
    closed = module.sparse_csr_topk_sum_backward(1.0, c.row_ptr, c.cols, c.vals, u, 0.0, -1, width, in_block,
                                                 live_end=live_end)
    tiles = module.sparse_csr_topk_sum_backward(1.0, c.row_ptr, c.cols, c.vals, u, 0.0, -1, width, in_block,
                                                product="dense", live_end=live_end)
    want_total, want_grad, _ = selection_sum(c.row_ptr, c.cols, c.vals, u, BIG_K)
    eps = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(total, want_total.double(), rtol=eps, atol=eps)
    scale = max(1.0, float(want_grad.abs().max()))
    torch.testing.assert_close(closed, want_grad, rtol=eps, atol=eps * scale)
    torch.testing.assert_close(tiles, want_grad, rtol=eps, atol=eps * scale)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("values", ["random", "ties", "signed"])
def test_the_sampled_bracket_finds_the_exact_kth_or_falls_back_to_the_histogram(dtype, values):
    """The k-th score from one pass over the block: a sample of its rows brackets it; where the
    bracket misses (a narrow one on a coarse sample), a second one from the estimate rescaled to
    the pass's count, and where that misses too the block is histogrammed whole. Every way gives
    the exact histogram's result, which is the selection's: the same total, k-th score, tie cut,
    count and gradient."""
    module = cpp_module()
    offsets, indices, vals, _, n = outlier_rows(dtype, integer=values == "ties", signed=values == "signed")
    c = co.canonical(offsets, indices, vals)
    u = c.uniq.numel()
    pairs = coactive_topk(offsets, indices, vals, n, BIG_K).values.numel()
    passes = {"blind": [], "wide": []}
    for k in (pairs // 50, pairs // 10, pairs // 3, pairs // 2, pairs - 1, pairs):
        exact = module.sparse_csr_topk_sum(c.row_ptr, c.cols, c.vals, u, k, bracket=0.0)
        assert exact[7] in (1, 2)  # the block's histogram, then the pass (just the pass when k covers it)
        # blind: a step past the block samples no row, so the estimate knows only the short rows'
        # pairs (fewer than k here) and its bracket misses (however far a coarse step widens it,
        # at most ±5 %); wide: every third row, ±50 % of k
        for name, bracket, step in (("blind", 1e-9, 10**6), ("wide", 0.5, 3)):
            out = module.sparse_csr_topk_sum(c.row_ptr, c.cols, c.vals, u, k, bracket=bracket, sample_step=step)
            # the same pairs (the total's float64 sum only grouped otherwise)
            torch.testing.assert_close(out[0], exact[0], rtol=1e-13, atol=0)
            assert torch.equal(out[1], exact[1]) and out[2:6] == exact[2:6]
            assert torch.equal(out[6], exact[6])
            passes[name].append(out[7])
        width, live_end = exact[5], exact[6]
        grad = module.sparse_csr_topk_sum_backward(1.0, c.row_ptr, c.cols, c.vals, u, float(exact[1]), exact[2], width,
                                                   live_end=live_end if live_end.numel() else None)
        want_total, want_grad, selection = selection_sum(c.row_ptr, c.cols, c.vals, u, k)
        assert float(exact[1]) == float(kth_score(selection.values.detach(), k)) if k < pairs else True
        eps = 1e-12 if dtype == torch.float64 else 2e-5
        torch.testing.assert_close(exact[0], want_total.double(), rtol=eps, atol=eps)
        torch.testing.assert_close(grad, want_grad, rtol=eps, atol=eps * max(1.0, float(want_grad.abs().max())))
    # a miss: the sample rescaled to the missed pass's count, a second pass; a sample that saw no
    # pair past the bracket (blind: the block's pairs are all past it) has nothing to rescale, and
    # the histogram and the exact pass follow
    assert passes["blind"][:3] == [3, 3, 3]
    assert 1 in passes["wide"]  # the sampled bracket's pass alone


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("signed", [True, False])
def test_a_missed_bracket_rescaled_to_the_pass_count_holds_the_kth(dtype, signed):
    """A bracket with no more slack than a coarse sample's misses the k-th score at some k; the
    second try, the sample rescaled to what the missed pass counted, holds it with one more pass
    (two in all, where the histogram's way takes three) and gives the exact histogram's result;
    the kept bits it leaves (positive float32 rows) give the backward's own gradient."""
    module = cpp_module()
    retried = 0
    for _ in range(20):  # fresh rows until a miss was recovered by the second try
        offsets, indices, vals, _, n = outlier_rows(dtype, signed=signed)
        c = co.canonical(offsets, indices, vals)
        u = c.uniq.numel()
        pairs = coactive_topk(offsets, indices, vals, n, BIG_K).values.numel()
        for k in (pairs // 50, pairs // 10, pairs // 3):
            exact = module.sparse_csr_topk_sum(c.row_ptr, c.cols, c.vals, u, k, bracket=0.0)
            for step in (8, 13, 40):
                out = module.sparse_csr_topk_sum(c.row_ptr, c.cols, c.vals, u, k, bracket=1e-9, sample_step=step,
                                                 keep_plan=True)
                torch.testing.assert_close(out[0], exact[0], rtol=1e-13, atol=0)
                assert torch.equal(out[1], exact[1]) and out[2:6] == exact[2:6] and torch.equal(out[6], exact[6])
                assert out[7] in (1, 2, 3, 4)  # (3: nothing to rescale; 4: the second try missed too)
                if out[7] != 2:
                    continue
                retried += 1
                if out[8].block_bits is not None:  # the bits the second pass left, against the scores
                    grads = [module.sparse_csr_topk_sum_backward(1.0, c.row_ptr, c.cols, c.vals, u, float(out[1]),
                                                                 out[2], out[5], product="dense", live_end=out[6],
                                                                 **extra) for extra in ({}, {"plan": out[8]})]
                    assert torch.equal(grads[0], grads[1])
        if retried:
            break
    assert retried


def test_int32_ids_unsorted_rows_and_half_precision():
    offsets, indices, values, n = rows_of("outliers", torch.float64)
    k = coactive_topk(offsets, indices, values, n, BIG_K).values.numel() // 3
    found, grad = summed(offsets.int(), indices.int(), values, n, k)  # rows in random order: a permutation
    want, want_grad, _ = selection_sum(offsets, indices, values, n, k)
    torch.testing.assert_close(found.total, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-12 * float(want_grad.abs().max()))
    for dtype in (torch.float16, torch.bfloat16):
        v = values.to(dtype)
        found, grad = summed(offsets, indices, v, n, k)
        want, want_grad, _ = selection_sum(offsets, indices, v, n, k)
        assert found.total.dtype == torch.float32 and grad.dtype == dtype
        torch.testing.assert_close(found.total, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad, want_grad)


def test_declines_where_it_does_not_apply_and_names_bad_input():
    offsets, indices, values, _ = ragged_rows(30, 40, 8)
    assert coactive_topk_sum(offsets, indices, values, 40, 5, similarity="cosine") is None
    offsets, values = torch.tensor([0, 2, 3]), torch.ones(3)
    with pytest.raises(ValueError, match="repeats a latent"):
        coactive_topk_sum(offsets, torch.tensor([1, 1, 2]), values, 4, 1)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        coactive_topk_sum(offsets, torch.tensor([0, 1, 2]), values, 2, 1)
    with pytest.raises(ValueError, match="NaN"):
        coactive_topk_sum(offsets, torch.tensor([0, 1, 2]), torch.tensor([1.0, float("nan"), 1.0]), 4, 1)
    with pytest.raises(ValueError, match="k must"):
        coactive_topk_sum(offsets, torch.tensor([0, 1, 2]), values, 4, 0)
    # one active latent: no pair, a zero that still reaches values
    v = torch.ones(2, requires_grad=True)
    found = coactive_topk_sum(torch.tensor([0, 1, 2]), torch.tensor([3, 3]), v, 4, 1)
    found.total.backward()
    assert float(found.total.detach()) == 0 and found.kept == 0 and bool((v.grad == 0).all())


def test_backward_rejects_a_block_of_other_rows():
    module = cpp_module()
    offsets, indices, values, n = rows_of("outliers", torch.float64)
    c = co.canonical(offsets, indices, values)
    out = module.sparse_csr_topk_sum(c.row_ptr, c.cols, c.vals, c.uniq.numel(), 10)
    with pytest.raises(RuntimeError, match="pass the width that sparse_csr_topk_sum returned"):
        module.sparse_csr_topk_sum_backward(1.0, c.row_ptr, c.cols, c.vals, c.uniq.numel(), float(out[1]), out[2],
                                            out[5] - 1)
    out = module.sparse_csr_topk_sum(c.row_ptr, c.cols, c.vals, c.uniq.numel(), 10, keep_plan=True)
    other = rows_of("outliers", torch.float64)
    oc = co.canonical(*other[:3])
    foreign = module.sparse_csr_topk_sum(oc.row_ptr, oc.cols, oc.vals, oc.uniq.numel(), 10, keep_plan=True)[8]
    single = module.sparse_csr_topk_sum(c.row_ptr, c.cols, c.vals.float(), c.uniq.numel(), 10, keep_plan=True)[8]
    for plan in (foreign, single):  # other rows, another dtype
        with pytest.raises(RuntimeError, match="pass the plan that sparse_csr_topk_sum returned for these rows"):
            module.sparse_csr_topk_sum_backward(1.0, c.row_ptr, c.cols, c.vals, c.uniq.numel(), float(out[1]), out[2],
                                                out[5], live_end=out[6], plan=plan)
    # the block's kept bits (positive float32 rows) with another k's staircase: refused, not read past
    positive = co.canonical(*rows_of("outliers", torch.float32, signed=False)[:3])
    u = positive.uniq.numel()
    pairs = coactive_topk(positive.row_ptr, positive.cols, positive.vals, u, BIG_K).values.numel()
    few, many = (module.sparse_csr_topk_sum(positive.row_ptr, positive.cols, positive.vals, u, k, keep_plan=True)
                 for k in (pairs // 50, pairs // 2))
    assert few[5] == many[5] and not torch.equal(few[6], many[6])
    with pytest.raises(RuntimeError, match="kept bits are for another staircase"):
        module.sparse_csr_topk_sum_backward(1.0, positive.row_ptr, positive.cols, positive.vals, u, float(few[1]),
                                            few[2], few[5], product="dense", live_end=many[6], plan=few[8])
    with pytest.raises(RuntimeError, match="bracket must be in"):
        module.sparse_csr_topk_sum(c.row_ptr, c.cols, c.vals, c.uniq.numel(), 10, bracket=1.5)
    with pytest.raises(RuntimeError, match="staircase_reach must be > 0"):
        module.sparse_csr_topk_sum(c.row_ptr, c.cols, c.vals, c.uniq.numel(), 10, staircase_reach=0.0)


def test_the_loss_sums_without_selecting_and_logs_from_the_count():
    """k below the co-active pairs: TopKOrthoLoss takes the sum (no selection in the call), and the
    share, the mean |C| and the checkpoint's k-th score equal the selection's."""
    offsets, indices, values, n = rows_of("outliers", torch.float32)
    pairs = coactive_topk(offsets, indices, values, n, BIG_K).values.numel()
    loss = TopKOrthoLoss(k=pairs // 3)
    v = values.clone().requires_grad_()
    penalty = loss.from_sparse((offsets, indices, v), n)
    assert loss._unselected is not None  # nothing selected yet
    penalty.backward()
    want_total, want_grad, selection = selection_sum(offsets, indices, values, n, pairs // 3)
    batch = offsets.numel() - 1
    torch.testing.assert_close(penalty.detach(), want_total / batch, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(v.grad, want_grad / batch, rtol=2e-5, atol=2e-5 * float(want_grad.abs().max()) / batch)
    assert loss.last_nonzero_share == 1.0  # every one of the k held a pair
    assert float(loss._kth) == float(kth_score(selection.values, pairs // 3))
    torch.testing.assert_close(loss.last_mean_abs, want_total / batch / (pairs // 3), rtol=2e-5, atol=1e-9)
    assert loss._unselected is not None  # the logging above needed no selection
    assert loss.last_pairs.values.numel() == pairs // 3  # made when asked for
    loss.last_pairs = None  # a reset forgets the count too
    assert loss.last_nonzero_share != loss.last_nonzero_share  # NaN


def _plan(rows, n):
    indices = torch.cat(rows)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.tensor([r.numel() for r in rows]).cumsum(0)])
    return cpp_module().sparse_dense_rows(offsets, indices, torch.rand(indices.numel()) + 0.05, n).tolist()


def _rows(rows):
    indices = torch.cat(rows)
    return torch.cat([torch.zeros(1, dtype=torch.int64), torch.tensor([r.numel() for r in rows]).cumsum(0)]), indices


def test_the_other_rows_pairs_inside_the_block_can_keep_it_out_of_the_sum():
    """BatchTopK mid-training: a few long rows, and many short ones on the same latents. The block
    would take the long rows' pairs off the pair path, but every short row's pairs inside it become
    corrections, so the sum of the k best keeps none (and relabels nothing: no live_end), where the
    same long rows beside short rows on other latents make a block. Value, k-th score and gradient
    are still the selection's, with and without the forward's plan: exactly, on values whose sums
    are exact in both dtypes (the selection, with the stored block's model, sums the long rows in
    another order)."""
    module = cpp_module()
    pool = 1000
    longs = [torch.randperm(pool)[:800] for _ in range(4)]
    elsewhere = [pool + torch.randperm(10**5)[:3] for _ in range(300)]
    offsets, indices = _rows(longs + elsewhere)
    c = co.canonical(offsets, indices, torch.rand(indices.numel()) + 0.05)
    assert module.sparse_dense_rows(c.row_ptr, c.cols, c.vals, c.uniq.numel(), recomputed=True).numel() == 4
    rows = longs + [torch.randperm(pool)[:30] for _ in range(300)]
    order = torch.randperm(len(rows)).tolist()
    offsets, indices = _rows([rows[t] for t in order])
    for dtype in (torch.float64, torch.float32):
        values = (torch.randint(1, 9, (indices.numel(),)) / 8).to(dtype)  # (dyadic: every sum exact)
        c = co.canonical(offsets, indices, values)
        u = c.uniq.numel()
        assert module.sparse_dense_rows(c.row_ptr, c.cols, c.vals.float(), u).numel() >= 1
        assert module.sparse_dense_rows(c.row_ptr, c.cols, c.vals.float(), u, recomputed=True).numel() == 0
        pairs = coactive_topk(offsets, indices, values, pool, BIG_K).values.numel()
        for k in (pairs // 20, pairs // 2):
            total, kth, tie_cut, kept, in_block, width, live_end, *_ = module.sparse_csr_topk_sum(
                c.row_ptr, c.cols, c.vals, u, k)
            assert width == 0 and live_end.numel() == 0 and kept == k
            grad = module.sparse_csr_topk_sum_backward(1.0, c.row_ptr, c.cols, c.vals, u, float(kth), tie_cut, width,
                                                       live_end=live_end)
            assert_is_the_selections(c, k, dtype, total, kth, grad)
            assert torch.equal(backward_from_plan(module, c, k), grad)


def test_a_row_too_wide_for_the_block_leaves_the_others_in_it():
    """Past 16384 latents a block is taken while it needs no more memory than the pair path would
    for its row pairs (one token on 16 500 latents: 1.4·10⁸ row pairs), never past 2¹⁶ latents;
    a row beyond that is skipped and the other dense rows still go to the block (the plan used to
    stop at the first row that did not fit: every row pair then went through the pair path)."""
    dense = [torch.randperm(600)[:300] for _ in range(3)]
    short = [torch.randperm(20000)[:3] for _ in range(40)]
    # the wide row is taken (the 300-latent rows would then widen a 16 500² block for few pairs)
    assert _plan([torch.randperm(20000)[:16500], *dense, *short], 20000) == [0]
    assert _plan([torch.randperm(70000)[:65600], *dense, *short], 70000) == [1, 2, 3]


def test_a_second_backward_gives_the_same_gradient():
    """retain_graph: SAELens' adapter tests and its runner differentiate the loss twice; the
    saved block is read, never overwritten, so the second gradient equals the first."""
    offsets, indices, values, n = rows_of("outliers", torch.float64)
    pairs = coactive_topk(offsets, indices, values, n, BIG_K).values.numel()
    v = values.clone().requires_grad_()
    found = coactive_topk_sum(offsets, indices, v, n, pairs - 3)
    (first,) = torch.autograd.grad(found.total, v, retain_graph=True)
    (second,) = torch.autograd.grad(found.total, v)
    torch.testing.assert_close(second, first, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_norm_order_relabels_short_and_long_rows_alike(dtype):
    """With a block on positive values the latents are relabelled by norm and every row's entries
    re-sorted by label (csrc/norm_order.h): a row short against the latents sorts its labels, a
    longer one reads them back from a bitmap. Rows of both kinds around a block: the sum, k-th score
    and gradient at several k are the selection's."""
    pool, n = 200, 4000
    rows = [torch.randperm(pool)[:150] for _ in range(6)]  # the block's rows
    rows += [torch.randperm(n)[: int(torch.randint(1, 6, ()))] for _ in range(400)]  # sorted: 5·256 < u
    rows += [torch.randperm(n)[: int(torch.randint(20, 60, ()))] for _ in range(20)]  # bitmap: 20·256 > n
    rows = [rows[i] for i in torch.randperm(len(rows)).tolist()]
    offsets, indices = _rows(rows)
    values = (torch.rand(indices.numel(), dtype=torch.float64) + 0.05).to(dtype)
    c = co.canonical(offsets, indices, values)
    u = c.uniq.numel()
    assert 5 * 256 < u < 20 * 256
    pairs = coactive_topk(offsets, indices, values, n, BIG_K).values.numel()
    for k in (pairs // 10, pairs // 2):
        *_, width, live_end, _, _ = cpp_module().sparse_csr_topk_sum(c.row_ptr, c.cols, c.vals, u, k)
        assert width > 0 and live_end.numel() == width  # the block, its latents in norm order
        found, grad = summed(offsets, indices, values, n, k)
        want, want_grad, selection = selection_sum(offsets, indices, values, n, k)
        assert found.kth == float(kth_score(selection.values.detach(), k))
        eps = 1e-12 if dtype == torch.float64 else 2e-5
        torch.testing.assert_close(found.total, want, rtol=eps, atol=eps)
        torch.testing.assert_close(grad, want_grad, rtol=eps, atol=eps * max(1.0, float(want_grad.abs().max())))


@pytest.mark.parametrize("dtype, width", [(torch.float32, 16500), (torch.float64, 11700)])
def test_a_block_past_the_width_cap_sums_and_differentiates_exactly(dtype, width):
    """One token on more latents than the 1 GiB block cap holds (16384 in float32, 11585 in
    float64), as BatchTopK has mid-training at 262144, plus short rows: the plan takes it as one
    block (its row pairs would cost more on the pair path), and with every pair kept the sum and
    gradient equal the closed form's Σ_t ((Σ f)² − Σ f²)/2, which never sees the block; with k = P
    the k-th score is the smallest, and k = P − 1 drops exactly it."""
    from aosae.ops.coactive_sum import coactive_sum

    n = width + 500
    rows = [torch.randperm(n)[:width]] + [torch.randperm(n)[: int(torch.randint(0, 6, ()))] for _ in range(30)]
    indices = torch.cat(rows)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.tensor([r.numel() for r in rows]).cumsum(0)])
    values = (torch.rand(indices.numel(), dtype=torch.float64) + 0.05).to(dtype)
    assert 0 in _plan(rows, n)  # the wide row is in the block
    found, grad = summed(offsets, indices, values, n, BIG_K)
    v = values.clone().requires_grad_()
    closed = coactive_sum(offsets, indices, v, n, BIG_K)
    closed.backward()
    eps = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(found.total, closed.detach(), rtol=eps, atol=0)
    torch.testing.assert_close(grad, v.grad, rtol=eps, atol=eps * float(v.grad.abs().max()))
    exact = coactive_topk_sum(offsets, indices, values, n, found.kept)
    assert exact.kept == found.kept and exact.kth > 0
    torch.testing.assert_close(exact.total, found.total, rtol=eps, atol=0)
    fewer = coactive_topk_sum(offsets, indices, values, n, found.kept - 1)
    torch.testing.assert_close(fewer.total, found.total - exact.kth, rtol=eps, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_sum_back_at_zero_lists_its_pair_once(dtype):
    """The forward lists a pair where its running sum is touched while 0: C_01 = 1 − 1 + 2 is back
    at 0 after two rows and touched again (listed twice, the copy dropped); C_23 = 1 − 1 and
    C_03 = C_12 = 0 are no pairs. P = 4: (0,1), (0,2), (1,3) at 2 and (4,5) at 3, at every k, with
    the backward read from the forward's plan equal to the one that derives it again."""
    module = cpp_module()
    rows = [([0, 1, 2, 3], [1, 1, 1, 1]), ([0, 1, 2, 3], [1, -1, 1, -1]), ([0, 1], [1, 2]), ([4, 5], [3, 1])]
    indices = torch.tensor([i for r, _ in rows for i in r])
    values = torch.tensor([v for _, vs in rows for v in vs], dtype=dtype)
    offsets = torch.tensor([0, 4, 8, 10, 12])
    assert coactive_topk(offsets, indices, values, 6, BIG_K).values.numel() == 4
    c = co.canonical(offsets, indices, values)
    for k in (1, 2, 3, 4, 5):
        found, grad = summed(offsets, indices, values, 6, k)
        want, want_grad, selection = selection_sum(offsets, indices, values, 6, k)
        assert found.kept == min(k, 4) and found.kth == float(kth_score(selection.values.detach(), k))
        torch.testing.assert_close(found.total, want, rtol=0, atol=0)
        torch.testing.assert_close(grad, want_grad, rtol=0, atol=0)
        _, kth, tie_cut, _, _, width, live_end, _, _ = module.sparse_csr_topk_sum(c.row_ptr, c.cols, c.vals, 6, k)
        derived = module.sparse_csr_topk_sum_backward(1.0, c.row_ptr, c.cols, c.vals, 6, float(kth), tie_cut, width,
                                                      live_end=live_end)
        torch.testing.assert_close(backward_from_plan(module, c, k), derived, rtol=0, atol=0)


def test_the_same_bits_whatever_the_thread_count():
    """Enough entries (nnz >= 8192) that each thread counts and places its own range of latents:
    one, two and three threads (uneven ranges) give the same total, cut, row pairs' scores and
    gradient, bit for bit."""
    module = cpp_module()
    B, L, n = 160, 64, 2000
    indices = torch.stack([torch.randperm(n)[:L] for _ in range(B)]).flatten()
    values = torch.randint(1, 5, (B * L,)).double() * torch.randint(0, 2, (B * L,)).mul(2).sub(1)
    c = co.canonical(torch.arange(B + 1) * L, indices, values)
    u, k = c.uniq.numel(), 5000
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            total, kth, tie_cut, kept, _, width, live_end, _, plan = module.sparse_csr_topk_sum(
                c.row_ptr, c.cols, c.vals, u, k, keep_plan=True)
            grad = module.sparse_csr_topk_sum_backward(1.0, c.row_ptr, c.cols, c.vals, u, float(kth), tie_cut, width,
                                                       live_end=live_end, plan=plan)
            runs.append((total, kth, tie_cut, kept, plan.pair_scores.clone(), plan.pair_runs.clone(), grad))
    finally:
        torch.set_num_threads(before)
    assert runs[0][3] == k
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_a_bracket_holding_more_pairs_than_a_chunk_of_its_lists():
    """Two rows on the same 1700 latents, every value 1: all 1.4 M pairs tie at score 2, so the
    pass collects every pair of the block inside the bracket, about 90 000 per part on two threads
    (16 parts), past several chunks of its lists (16 384 pairs; csrc/chunked_list.h). After a call
    on other latents has filled and given back chunks, the total, the k-th score, the cut among
    the tied pairs and the gradient are the selection's."""
    module = cpp_module()
    n, width = 2000, 1700

    def two_rows():
        latents = torch.randperm(n)[:width].sort().values
        return co.canonical(torch.tensor([0, width, 2 * width]), latents.repeat(2), torch.ones(2 * width))

    pairs = width * (width - 1) // 2
    k = pairs // 2 + 7
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for c in (two_rows(), two_rows()):  # (the first leaves its pairs in the chunks the second takes)
            total, kth, tie_cut, kept, _, width_taken, live_end, _, plan = module.sparse_csr_topk_sum(
                c.row_ptr, c.cols, c.vals, c.uniq.numel(), k, keep_plan=True)
            assert width_taken == width  # the block: its pass collects the pairs inside the bracket
            grad = module.sparse_csr_topk_sum_backward(1.0, c.row_ptr, c.cols, c.vals, c.uniq.numel(), float(kth),
                                                       tie_cut, width_taken, live_end=live_end, plan=plan)
    finally:
        torch.set_num_threads(before)
    assert float(kth) == 2.0 and int(kept) == k and float(total) == 2.0 * k
    assert_is_the_selections(c, k, torch.float32, total.double(), kth, grad)
