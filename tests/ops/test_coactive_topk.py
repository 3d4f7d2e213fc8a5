"""coactive_topk, the never-padding selection, against the float64 oracle: every route (C++,
torch, Triton under the interpreter), ragged and empty rows, ties, zeros, k < P / = P / > P,
gradients, and memory at n = 2²⁴."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from aosae.ops import coactive_topk as co
from aosae.ops.coactive_topk import coactive_topk, coactive_topk_dense
from aosae.ops.gram_topk import gram_topk
from oracle import oracle_topk

ROUTES = ("cpp", "torch")


@pytest.fixture(autouse=True)
def _fresh_inputs(seed):
    """Every test draws fresh random inputs (conftest's `seed` reseeds torch and prints it)."""


def cpp_module():
    """The C++ extension, or a skip that says how to build it (in CI a missing build fails
    tests/ops/test_gram_topk.py::test_extension_is_built_in_ci instead)."""
    module = co._cpp()
    if module is None:
        pytest.skip("aosae._C (sparse_csr_coactive) is not built: pip install --no-build-isolation -e .")
    return module


def random_values(nnz, *, integer=False, signed=False, zeros=0.0):
    """nnz float64 activations: in [0.05, 1.05) (or the integers 1..3 for exact ties), random signs
    if signed, a `zeros` share set to 0."""
    values = torch.randint(1, 4, (nnz,)).double() if integer else torch.rand(nnz, dtype=torch.float64) + 0.05
    if signed:
        values = values * (torch.randint(0, 2, (nnz,)) * 2 - 1)
    if zeros:
        values[torch.rand(nnz) < zeros] = 0
    return values


def ragged_rows(B, n, max_l0, *, dtype=torch.float64, pool=None, signed=False, integer=False, zeros=0.0,
                shuffle=True):
    """CSR rows of random lengths 0..max_l0 (distinct latents from the first `pool`), in a random
    order within each row. Returns (offsets, indices, values, dense [B, n] float64)."""
    pool = n if pool is None else pool
    lengths = torch.randint(0, max_l0 + 1, (B,))
    idx = [torch.randperm(pool)[: int(length)] for length in lengths]
    if not shuffle:
        idx = [i.sort().values for i in idx]
    indices = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.int64)
    values = random_values(indices.numel(), integer=integer, signed=signed, zeros=zeros)
    offsets = torch.zeros(B + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    values = values.to(dtype)
    dense = torch.zeros(B, n, dtype=torch.float64)
    rows = torch.repeat_interleave(torch.arange(B), lengths)
    dense[rows, indices] = values.double()
    return offsets, indices, values, dense


def run(route, offsets, indices, values, n, k, cosine):
    """The selection through one route (the op itself for "auto")."""
    if route == "auto":
        return coactive_topk(offsets, indices, values, n, k, similarity="cosine" if cosine else "dot")
    if route == "cpp":
        cpp_module()
    return co.select(co.canonical(offsets, indices, values), k, cosine, impl=route)[:3]


def nonzero_pairs(dense, cosine):
    return len(oracle_topk(dense, 10**12, cosine)[0])


def check(pairs, dense, k, cosine, dtype):
    """min(k, P) entries: k < P equals the oracle's top-k in order; k >= P is every pair,
    grouped by row ascending, values exact."""
    values, rows, cols = pairs
    top, c = oracle_topk(dense, k, cosine)
    every, _ = oracle_topk(dense, 10**12, cosine)
    assert values.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert rows.dtype == cols.dtype == torch.int64
    assert values.shape == rows.shape == cols.shape == (min(k, len(every)),)
    tol = (1e-10 if dtype == torch.float64 else 2e-5) * max(float(c.abs().max()), 1e-30)
    torch.testing.assert_close(values.double(), c[rows, cols], atol=tol, rtol=0)
    assert bool((rows < cols).all()) and bool((values != 0).all())
    got = list(zip(rows.tolist(), cols.tolist()))
    assert len(set(got)) == len(got)
    if k >= len(every):
        assert set(got) == {(i, j) for _, i, j, _ in every}
        assert bool((rows[1:] >= rows[:-1]).all()), "k >= P: grouped by row ascending"
    else:
        want = [(i, j) for _, i, j, _ in top]
        if dtype == torch.float64 and want != got:
            # Only scores equal in exact arithmetic may be ordered differently by rounding (cosine: two
            # latents that fire in one row only have the same |cosine| with any third latent): each
            # difference is between near-equal scores, and what is missing tied with the k-th score.
            score = lambda pair: abs(float(c[pair]))  # noqa: E731
            assert all(abs(score(a) - score(b)) <= tol for a, b in zip(got, want) if a != b)
            assert all(score(pair) - top[-1][0] <= tol for pair in set(want) - set(got))
        torch.testing.assert_close(values.abs().double(), torch.tensor([t[0] for t in top], dtype=torch.float64),
                                   atol=tol, rtol=0)


@pytest.mark.parametrize("route", ROUTES + ("auto",))
@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("share", [0.1, 1.0, 10.0])  # k < P, k = P (share 1), k > P
def test_matches_oracle_ragged(route, cosine, share):
    offsets, indices, values, dense = ragged_rows(40, 50, 9, pool=30, signed=True, zeros=0.1)
    p = nonzero_pairs(dense, cosine)
    k = max(1, int(share * p))
    check(run(route, offsets, indices, values, 50, k, cosine), dense, k, cosine, torch.float64)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs(route, dtype):
    offsets, indices, values, dense = ragged_rows(30, 40, 8, dtype=dtype)
    dense = torch.zeros_like(dense)
    rows = torch.repeat_interleave(torch.arange(30), offsets[1:] - offsets[:-1])
    dense[rows, indices] = values.double()  # the oracle sees the rounded inputs
    p = nonzero_pairs(dense, False)
    for k in (max(1, p // 3), p + 5):
        check(run(route, offsets, indices, values, 40, k, False), dense, k, False, dtype)


@pytest.mark.parametrize("route", ROUTES)
def test_ties_are_ordered_by_row_and_col(route):
    offsets, indices, values, dense = ragged_rows(60, 25, 6, integer=True)  # small integers: many exact ties
    p = nonzero_pairs(dense, False)
    k = max(1, p // 2)
    values_, rows, cols = run(route, offsets, indices, values, 25, k, False)
    want = oracle_topk(dense, k, False)[0]
    assert list(zip(rows.tolist(), cols.tolist())) == [(i, j) for _, i, j, _ in want]


@pytest.mark.parametrize("route", ROUTES + ("auto",))
def test_empty_rows_and_no_pairs(route):
    offsets = torch.tensor([0, 0, 1, 1, 2])  # rows of 0, 1, 0, 1 entries: no co-active pair
    indices, values = torch.tensor([3, 5]), torch.tensor([1.0, 2.0])
    out = run(route, offsets, indices, values, 8, 4, False)
    assert [t.numel() for t in out] == [0, 0, 0] and out[0].dtype == torch.float32
    empty = run(route, torch.zeros(3, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), torch.zeros(0), 8, 4, True)
    assert [t.numel() for t in empty] == [0, 0, 0]


def test_input_order_within_rows_does_not_matter():
    offsets, indices, values, dense = ragged_rows(30, 40, 8, shuffle=False)
    k = nonzero_pairs(dense, False) // 2
    sorted_rows = coactive_topk(offsets, indices, values, 40, k)
    perm = torch.cat([torch.randperm(int(b - a)) + a for a, b in zip(offsets[:-1], offsets[1:])])
    shuffled = coactive_topk(offsets, indices[perm], values[perm], 40, k)
    for x, y in zip(sorted_rows, shuffled):
        assert torch.equal(x, y)


def test_k_above_every_pair_lists_rows_in_kernel_order_deterministically():
    offsets, indices, values, dense = ragged_rows(50, 60, 10, pool=35)
    k = 60 * 59 // 2 + 1000  # more than n(n−1)/2: allowed, "every pair"
    first = coactive_topk(offsets, indices, values, 60, k)
    again = coactive_topk(offsets, indices, values, 60, k)
    for x, y in zip(first, again):
        assert torch.equal(x, y)
    check(first, dense, k, False, torch.float64)


def separated_rows(cosine, gap=1e-4):
    """Signed ragged rows whose top pair |similarities| differ by more than `gap`: a finite difference
    (eps 1e-6) must not reorder the top-k, or the numerical Jacobian's rows swap. Random draws tie
    often (a latent that fires in one row has cosine ±a/|a| with every partner there)."""
    for _ in range(200):
        offsets, indices, values, dense = ragged_rows(12, 16, 5, pool=10, signed=True)
        magnitudes = torch.tensor([entry[0] for entry in oracle_topk(dense, 10**12, cosine)[0]])
        head = magnitudes[: magnitudes.numel() // 2 + 1]  # the top half is ranked, and cut after it
        if magnitudes.numel() >= 4 and bool((head[:-1] - head[1:] > gap).all()):
            return offsets, indices, values, dense
    raise AssertionError("no draw without near-ties in 200 tries")


@pytest.mark.parametrize("route", ROUTES + ("auto",))
@pytest.mark.parametrize("cosine", [False, True])
def test_gradcheck(route, cosine):
    offsets, indices, values, dense = separated_rows(cosine)
    p = nonzero_pairs(dense, cosine)
    for k in (max(1, p // 2), p + 3):
        def f(v):
            if route == "auto":
                return coactive_topk(offsets, indices, v, 16, k, similarity="cosine" if cosine else "dot").values
            c = co.canonical(offsets, indices, v)
            return _Select.apply(v, c, k, cosine, route)
        if route == "cpp":
            cpp_module()
        torch.autograd.gradcheck(f, (values.clone().requires_grad_(),), eps=1e-6, atol=1e-7)


class _Select(torch.autograd.Function):
    """One route's selection and support_grad as an autograd function (the op always picks auto)."""

    @staticmethod
    def forward(ctx, v, c, k, cosine, route):
        c = c._replace(vals=v.detach() if c.perm is None else v.detach()[c.perm])
        out = co.select(c, k, cosine, impl=route)
        ctx.c, ctx.cosine, ctx.route, ctx.out = c, cosine, route, out
        return out[0]

    @staticmethod
    def backward(ctx, g):
        grad = co.support_grad(ctx.c, g, ctx.out[0], ctx.out[3], ctx.out[4], ctx.cosine, impl=ctx.route)
        if ctx.c.perm is not None:
            grad = torch.empty_like(grad).index_copy_(0, ctx.c.perm, grad)
        return grad, None, None, None, None


@pytest.mark.parametrize("cosine", [False, True])
def test_gradient_matches_dense_gram_topk(cosine):
    """The gradient w.r.t. the CSR values equals gram_topk's dense gradient at those entries,
    zero-valued entries included."""
    offsets, indices, values, dense = ragged_rows(40, 30, 7, pool=20, zeros=0.2)
    values = values.float()
    k = max(1, nonzero_pairs(dense, cosine) // 3)
    sim = "cosine" if cosine else "dot"
    v = values.clone().requires_grad_()
    pairs = coactive_topk(offsets, indices, v, 30, k, similarity=sim)
    weights = torch.randn(pairs.values.numel())
    (pairs.values * weights).sum().backward()
    a = dense.float().requires_grad_()
    ref = gram_topk(a, k, similarity=sim, backend="reference")
    (ref.values * weights).sum().backward()
    rows = torch.repeat_interleave(torch.arange(40), offsets[1:] - offsets[:-1])
    torch.testing.assert_close(v.grad, a.grad[rows, indices], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cosine", [False, True])
def test_dense_entry_matches_gram_topk_values_and_gradient(cosine):
    _, _, _, dense = ragged_rows(30, 40, 8, pool=25)
    a = dense.float()
    sim = "cosine" if cosine else "dot"
    p = nonzero_pairs(dense, cosine)
    for k in (max(1, p // 2), p + 10):
        x = a.clone().requires_grad_()
        mine = coactive_topk_dense(x, k, similarity=sim)
        mine.values.abs().sum().backward()
        y = a.clone().requires_grad_()
        ref = gram_topk(y, k, similarity=sim, backend="reference")
        ref.values.abs().sum().backward()
        s = mine.values.numel()
        assert s == min(k, p)
        assert set(zip(mine.rows.tolist(), mine.cols.tolist())) == set(zip(ref.rows[:s].tolist(), ref.cols[:s].tolist()))
        torch.testing.assert_close(y.grad, x.grad, rtol=1e-4, atol=1e-5)


def test_bad_input_is_named():
    offsets, indices, values = torch.tensor([0, 2, 3]), torch.tensor([1, 1, 2]), torch.ones(3)
    with pytest.raises(ValueError, match="repeats a latent"):
        coactive_topk(offsets, indices, values, 4, 3)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        coactive_topk(offsets, torch.tensor([0, 1, 2]), values, 2, 3)
    with pytest.raises(ValueError, match="offsets"):
        coactive_topk(torch.tensor([0, 2, 4]), torch.tensor([0, 1, 2]), values, 4, 3)
    with pytest.raises(ValueError, match="NaN"):
        coactive_topk(offsets, torch.tensor([0, 1, 2]), torch.tensor([1.0, float("nan"), 1.0]), 4, 3)
    with pytest.raises(ValueError, match="k must"):
        coactive_topk(offsets, torch.tensor([0, 1, 2]), values, 4, 0)
    with pytest.raises(ValueError, match="1-D"):
        coactive_topk(offsets, torch.tensor([[0, 1, 2]]), values[None], 4, 3)
    with pytest.raises(TypeError, match="int64"):
        coactive_topk(offsets, torch.tensor([0.0, 1.0, 2.0]), values, 4, 3)


def test_fake_kernel_has_a_dynamic_size():
    offsets, indices, values, _ = ragged_rows(10, 20, 5)
    torch.library.opcheck(torch.ops.aosae.coactive_topk.default, (offsets, indices, values.float(), 20, 7, "dot"))


def test_wide_latents_run_in_small_memory():
    """n = 2²⁴ and the paper's k (≈ 7·10¹¹): in a subprocess, the call's peak RSS grows by less
    than 64 MiB, the size of one n-sized float32 array (a k-sized buffer would need terabytes)."""
    script = textwrap.dedent("""
        import resource, torch
        from aosae.ops.coactive_topk import coactive_topk
        from aosae.ops.gram_topk import k_for_fraction
        torch.set_num_threads(2)
        n, B, L = 2 ** 24, 64, 32
        # a tiny call first: torch's custom-op machinery imports torch._dynamo on its first call
        coactive_topk(torch.tensor([0, 2]), torch.tensor([1, 5]), torch.ones(2), n, 1)
        idx = torch.randint(0, n // L, (B, L)) + torch.arange(L) * (n // L)  # distinct within a row
        offsets = torch.arange(B + 1) * L
        values = (torch.rand(B * L) + 0.1).requires_grad_()
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        pairs = coactive_topk(offsets, idx.flatten(), values, n, k_for_fraction(n, 0.005))
        pairs.values.abs().sum().backward()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(pairs.values.numel(), (peak - base) / 1024)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    count, extra_mib = out.stdout.split()
    assert 0 < int(count) <= 64 * 32 * 31 // 2
    assert float(extra_mib) < 64, f"peak RSS grew by {extra_mib} MiB at n = 2^24"


TRITON = importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not TRITON, reason="needs triton and TRITON_INTERPRET=1 (the GPU route on CPU)")


@needs_triton
@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("share", [0.3, 1.0, 5.0])
def test_triton_route_matches_oracle(cosine, share):
    """The GPU route (Triton, run by the interpreter): rows longer than a tile (16 here)."""
    offsets, indices, values, dense = ragged_rows(16, 40, 22, pool=30, dtype=torch.float32, signed=True, zeros=0.1)
    k = max(1, int(share * nonzero_pairs(dense, cosine)))
    check(run("triton", offsets, indices, values, 40, k, cosine), dense, k, cosine, torch.float32)


@needs_triton
@pytest.mark.parametrize("cosine", [False, True])
def test_triton_route_gradient_matches_torch_route(cosine):
    offsets, indices, values, dense = ragged_rows(12, 30, 20, pool=24, dtype=torch.float32, zeros=0.1)
    c = co.canonical(offsets, indices, values)
    for k in (max(1, nonzero_pairs(dense, cosine) // 2), 10**6):
        out = co.select(c, k, cosine, impl="triton")
        g = torch.randn(out[0].numel())
        got = co.support_grad(c, g, out[0], out[3], out[4], cosine, impl="triton")
        want = co.support_grad(c, g, out[0], out[3], out[4], cosine, impl="torch")
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@needs_triton
def test_op_takes_the_triton_route_when_asked(monkeypatch):
    """AOSAE_SPARSE_TRITON=1 sends the op's CPU tensors down the GPU route, forward and backward."""
    from aosae.ops.backends import sparse_triton

    calls = []
    for name in ("csr_topk", "support_grad"):
        monkeypatch.setattr(sparse_triton, name, lambda *a, _f=getattr(sparse_triton, name), _n=name, **kw:
                            calls.append(_n) or _f(*a, **kw))
    monkeypatch.setenv(sparse_triton.FORCE_ENV, "1")
    offsets, indices, values, dense = ragged_rows(10, 30, 8, dtype=torch.float32)
    k = max(1, nonzero_pairs(dense, False) // 2)
    v = values.clone().requires_grad_()
    pairs = coactive_topk(offsets, indices, v, 30, k)
    pairs.values.abs().sum().backward()
    assert calls == ["csr_topk", "support_grad"]
    check(tuple(t.detach() for t in pairs), dense, k, False, torch.float32)
    monkeypatch.setenv(sparse_triton.FORCE_ENV, "0")
    w = values.clone().requires_grad_()
    coactive_topk(offsets, indices, w, 30, k).values.abs().sum().backward()
    torch.testing.assert_close(v.grad, w.grad, rtol=1e-5, atol=1e-5)


def outlier_rows(dtype, *, integer=False, zeros=0.0, signed=True, long_rows=6, long_l0=150, pool=200,
                 long_zeros=None):
    """BatchTopK-like rows: many short rows (0..6 latents) and a few very long ones (long_l0 of
    `pool` latents) at random positions, which the C++ kernel sums with its GEMM block, forward
    and backward. Six long rows: a latent seen in one row only would have cosine ±1 with its
    row's other such latents, exact ties that rounding orders at random. long_l0 may list one
    length per long row (long_rows is then its length), long_zeros each long row's share of zero
    values (default: `zeros`, as the short rows). Returns (offsets, indices, values, dense [B, n] float64, n)."""
    n = pool + 20
    offsets, indices, values, _ = ragged_rows(48, n, 6, pool=pool, dtype=torch.float64)
    rows = [indices[int(a):int(b)] for a, b in zip(offsets[:-1], offsets[1:])]
    long_lengths = long_l0 if isinstance(long_l0, (list, tuple)) else [long_l0] * long_rows
    shares = [zeros] * len(rows)  # each row's share of zero values
    for length, share in zip(long_lengths, long_zeros if long_zeros is not None else [zeros] * len(long_lengths)):
        at = int(torch.randint(0, len(rows) + 1, ()))
        rows.insert(at, torch.randperm(pool)[:length])
        shares.insert(at, share)
    lengths = torch.tensor([r.numel() for r in rows])
    indices = torch.cat(rows)
    values = torch.cat([random_values(r.numel(), integer=integer, signed=signed, zeros=share)
                        for r, share in zip(rows, shares)])
    values = values.to(dtype)
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    dense = torch.zeros(lengths.numel(), n, dtype=torch.float64)
    dense[torch.repeat_interleave(torch.arange(lengths.numel()), lengths), indices] = values.double()
    return offsets, indices, values, dense, n


def assert_block_taken(offsets, indices, values):
    """The rows go through the GEMM block (else these tests would test the pair path again)."""
    module = cpp_module()
    c = co.canonical(offsets, indices, values)
    assert module.sparse_dense_rows(c.row_ptr, c.cols, c.vals.float(), c.uniq.numel()).numel() >= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("share", [0.05, 1.0, 10.0])
def test_outlier_rows_match_oracle(dtype, cosine, share):
    offsets, indices, values, dense, n = outlier_rows(dtype, zeros=0.05)
    assert_block_taken(offsets, indices, values)
    k = max(1, int(share * nonzero_pairs(dense, cosine)))
    for route in ("cpp", "auto"):
        check(run(route, offsets, indices, values, n, k, cosine), dense, k, cosine, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_outlier_rows_ties_are_ordered_by_row_and_col(dtype):
    """Small integers: the GEMM block's sums are exact, so ties are exact and (i, j) orders them."""
    offsets, indices, values, dense, n = outlier_rows(dtype, integer=True)
    assert_block_taken(offsets, indices, values)
    k = max(1, nonzero_pairs(dense, False) // 3)
    got_values, rows, cols = run("cpp", offsets, indices, values, n, k, False)
    want = oracle_topk(dense, k, False)[0]
    assert list(zip(rows.tolist(), cols.tolist())) == [(i, j) for _, i, j, _ in want]
    assert got_values.abs().tolist() == [v for v, _, _, _ in want]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("share", [0.3, 10.0])
def test_outlier_rows_gradient_matches_dense_gram_topk(dtype, cosine, share):
    """The backward's product over the long rows (and the slots of the short ones) against
    gram_topk's dense reference gradient, zero-valued entries included."""
    offsets, indices, values, dense, n = outlier_rows(dtype, zeros=0.05)
    assert_block_taken(offsets, indices, values)
    sim = "cosine" if cosine else "dot"
    k = max(1, int(share * nonzero_pairs(dense, cosine)))
    v = values.clone().requires_grad_()
    pairs = coactive_topk(offsets, indices, v, n, k, similarity=sim)
    weights = torch.randn(pairs.values.numel(), dtype=pairs.values.dtype)
    (pairs.values * weights).sum().backward()
    a = dense.to(dtype).requires_grad_()
    ref = gram_topk(a, min(k, n * (n - 1) // 2), similarity=sim, backend="reference")
    s = pairs.values.numel()
    assert set(zip(pairs.rows.tolist(), pairs.cols.tolist())) == set(zip(ref.rows[:s].tolist(), ref.cols[:s].tolist()))
    # the reference's weights follow the same pairs in its own order
    where = {pair: w for pair, w in zip(zip(pairs.rows.tolist(), pairs.cols.tolist()), weights.tolist())}
    ref_weights = torch.tensor([where.get(pair, 0.0) for pair in zip(ref.rows.tolist(), ref.cols.tolist())],
                               dtype=ref.values.dtype)
    (ref.values * ref_weights).sum().backward()
    rows = torch.repeat_interleave(torch.arange(dense.shape[0]), offsets[1:] - offsets[:-1])
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(v.grad, a.grad[rows, indices], **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("share", [0.05, 10.0])
def test_outlier_rows_block_gradient_sparse_and_dense_agree(dtype, cosine, share):
    """The backward's two ways of taking the long rows' product A_H · G_U (per selected pair, or
    one GEMM against G_U built dense), each forced, give the gradient the op's backward gives
    (checked against gram_topk's in the test above)."""
    module = cpp_module()
    offsets, indices, values, dense, n = outlier_rows(dtype, zeros=0.05)
    assert_block_taken(offsets, indices, values)
    k = max(1, int(share * nonzero_pairs(dense, cosine)))
    sim = "cosine" if cosine else "dot"
    v = values.clone().requires_grad_()
    pairs = coactive_topk(offsets, indices, v, n, k, similarity=sim)
    weights = torch.randn(pairs.values.numel(), dtype=pairs.values.dtype)
    (pairs.values * weights).sum().backward()
    c = co.canonical(offsets, indices, values)
    out_values, _, _, rows, cols = co.select(c, k, cosine)
    # atol on the gradient's scale: a cosine gradient that cancels to ~0 keeps float32 rounding of its terms
    eps = 1e-11 if dtype == torch.float64 else 1e-5
    tol = dict(rtol=1e-10 if dtype == torch.float64 else 1e-5, atol=eps * max(1.0, float(v.grad.abs().max())))
    for block in ("sparse", "dense"):
        grad = module.coactive_backward_cpu(weights, c.row_ptr, c.cols, c.vals, out_values, rows, cols,
                                            c.uniq.numel(), cosine, block)
        if c.perm is not None:
            grad = torch.empty_like(grad).index_copy_(0, c.perm, grad)
        torch.testing.assert_close(grad.to(dtype), v.grad, **tol)
    with pytest.raises(RuntimeError, match="block must be 'auto', 'sparse' or 'dense'"):
        module.coactive_backward_cpu(weights, c.row_ptr, c.cols, c.vals, out_values, rows, cols, c.uniq.numel(),
                                     cosine, "gemm")


def _pair_set(pairs):
    return set(zip(pairs[1].tolist(), pairs[2].tolist()))


@pytest.mark.parametrize("route", ROUTES + ("auto",))
@pytest.mark.parametrize("integer", [False, True])  # integers: many exact ties at the k-th score
@pytest.mark.parametrize("long_rows", [0, 6])  # 6: the C++ kernel's GEMM block holds some pairs
def test_unordered_is_the_sorted_selections_set(route, integer, long_rows):
    """ordered=False keeps the sorted call's k pairs (ties at the k-th |value| settled by (row,
    col) as there), each with its value, laid out grouped by row; k >= P is unchanged."""
    dtype = torch.float64 if integer else torch.float32
    offsets, indices, values, dense, n = outlier_rows(dtype, integer=integer, zeros=0.05, long_rows=long_rows)
    p = nonzero_pairs(dense, False)
    for k in (1, max(1, p // 7), max(1, p // 2), p - 1, p, p + 3):
        if route == "auto":
            sorted_ = coactive_topk(offsets, indices, values, n, k)
            unordered = coactive_topk(offsets, indices, values, n, k, ordered=False)
        else:
            sorted_ = run(route, offsets, indices, values, n, k, False)
            unordered = co.select(co.canonical(offsets, indices, values), k, False, impl=route, ordered=False)[:3]
        assert unordered[0].numel() == min(k, p)
        assert _pair_set(unordered) == _pair_set(sorted_)
        value_of = dict(zip(zip(sorted_[1].tolist(), sorted_[2].tolist()), sorted_[0].tolist()))
        assert [value_of[pair] for pair in zip(unordered[1].tolist(), unordered[2].tolist())] == unordered[0].tolist()
        if route != "auto":
            assert bool((unordered[1][1:] >= unordered[1][:-1]).all()), "grouped by row ascending"


@pytest.mark.parametrize("long_rows", [0, 6])  # 0: the backward's parallel ptr over a grouped selection
def test_unordered_gradient_equals_sorted(long_rows):
    offsets, indices, values, dense, n = outlier_rows(torch.float64, zeros=0.05, long_rows=long_rows)
    k = max(1, nonzero_pairs(dense, False) // 3)
    grads = []
    for ordered in (True, False):
        v = values.clone().requires_grad_()
        coactive_topk(offsets, indices, v, n, k, ordered=ordered).values.abs().sum().backward()
        grads.append(v.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="ordered must be a bool"):
        coactive_topk(offsets, indices, values, n, k, ordered="no")


@pytest.mark.parametrize("ordered", [True, False])
@pytest.mark.parametrize("share", [0.3, 10.0])  # k < P (sorted or unordered set), k >= P (every pair)
def test_cpp_selection_writes_original_and_compact_ids(ordered, share):
    """The C++ kernel writes each pair's original ids beside its compact ones (the backward's):
    they must name the same latents."""
    module = cpp_module()
    offsets, indices, values, dense, n = outlier_rows(torch.float32, zeros=0.05)
    indices = indices * 997 + 5  # original ids far from the compact ones
    c = co.canonical(offsets, indices, values)
    k = max(1, int(share * nonzero_pairs(dense, False)))
    got, rows, cols, rows_c, cols_c = co.select(c, k, False, impl="cpp", ordered=ordered)
    assert rows.numel() == min(k, nonzero_pairs(dense, False))
    assert torch.equal(c.uniq[rows_c], rows) and torch.equal(c.uniq[cols_c], cols)
    # without ids the binding returns the compact pair twice
    plain = module.sparse_csr_coactive(c.row_ptr, c.cols, c.vals, c.uniq.numel(), k, False, ordered)
    assert torch.equal(plain[0], got) and torch.equal(plain[1], rows_c) and torch.equal(plain[3], rows_c)
    with pytest.raises(RuntimeError, match="ids must be a 1-D int64 CPU tensor"):
        module.sparse_csr_coactive(c.row_ptr, c.cols, c.vals, c.uniq.numel(), k, False, ordered, c.uniq[:1])


def test_large_buffers_are_reused_and_reused_ones_are_rewritten():
    """Outputs of 1 MiB and more come from a pool of freed buffers (csrc/buffer_pool.h): a second
    call takes the first's pages, and what it returns is exactly what fresh pages gave, including
    the backward's zero-filled block (stale sums there would change the gradient)."""
    module = cpp_module()
    # 6 long rows of 1500 of 1600 latents: the block is 1600² float32 (10 MB), and nearly all of the
    # 1.28 M pairs of U × U are co-active (their int64 ids 10 MB each)
    offsets, indices, values, _, n = outlier_rows(torch.float32, zeros=0.05, long_l0=1500, pool=1600)
    assert_block_taken(offsets, indices, values)
    c = co.canonical(offsets, indices, values)
    module.release_buffer_pool()
    assert module.buffer_pool_free_bytes() == 0
    for k in (10**12, 1_100_000):  # every pair; the best k (their set, unordered)
        first = [t.clone() for t in co.select(c, k, False, impl="cpp", ordered=False)]
        assert first[0].numel() >= 1_100_000  # int64 ids of 8.8 MB and more: pooled
        weights = torch.linspace(-1, 1, first[0].numel())
        grads = [module.coactive_backward_cpu(weights, c.row_ptr, c.cols, c.vals, first[0], first[3], first[4],
                                              c.uniq.numel(), False, block) for block in ("dense", "dense", "sparse")]
        torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
        torch.testing.assert_close(grads[2], grads[0], rtol=1e-4, atol=1e-3)  # no block: nothing stale to read
        kept = module.buffer_pool_free_bytes()
        assert kept >= 4 * 8 * 1_100_000  # the first selection's four id arrays are back
        reused, grown, mapped = module.buffer_pool_counts()
        again = co.select(c, k, False, impl="cpp", ordered=False)
        assert module.buffer_pool_free_bytes() < kept  # taken from the pool, not mapped afresh
        now = module.buffer_pool_counts()  # every request met from a free buffer
        assert now[0] > reused and now[1:] == (grown, mapped)
        for got, want in zip(again, first):
            assert torch.equal(got, want)
        del again
    assert module.release_buffer_pool() > 0 and module.buffer_pool_free_bytes() == 0


def test_an_outgrown_buffer_grows_into_the_larger_request():
    """A request larger than every free buffer grows the largest smaller one (its pages stay mapped)
    instead of mapping a new one: a selection of 150 000 pairs, then one of every pair (1.28 M).
    What the grown buffers return is exactly what fresh pages gave."""
    module = cpp_module()
    offsets, indices, values, _, n = outlier_rows(torch.float32, zeros=0.05, long_l0=1500, pool=1600)
    c = co.canonical(offsets, indices, values)
    module.release_buffer_pool()
    fresh = [t.clone() for t in co.select(c, 10**12, False, impl="cpp", ordered=False)]
    module.release_buffer_pool()
    small = co.select(c, 150_000, False, impl="cpp", ordered=False)
    assert small[0].numel() * 8 >= 1 << 20  # pooled
    del small
    grown = module.buffer_pool_counts()[1]
    again = co.select(c, 10**12, False, impl="cpp", ordered=False)
    assert module.buffer_pool_counts()[1] > grown
    for got, want in zip(again, fresh):
        assert torch.equal(got, want)
    del again
    module.release_buffer_pool()


@pytest.mark.parametrize("spread", [1, 2**20])  # ids within 16·nnz (the C++ rank table) or far wider (its radix sort)
def test_canonical_equals_the_torch_version(spread):
    cpp_module()
    offsets, indices, values, _ = ragged_rows(50, 300, 12, signed=True)
    indices = indices * spread + spread // 3
    n = 300 * spread
    got = co.canonical(offsets, indices, values, n=n)
    want = co._canonical_torch(offsets, indices, values, check=True)
    assert torch.equal(got.uniq, want.uniq) and torch.equal(got.cols, want.cols) and torch.equal(got.vals, want.vals)
    assert (got.perm is None) == (want.perm is None)
    if got.perm is not None:
        assert torch.equal(got.perm, want.perm)
