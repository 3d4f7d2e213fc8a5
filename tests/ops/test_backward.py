"""The gradient of gram_topk and gram_topk_sparse (scatter and product paths, C++ and torch)
against the float64 dense-autograd oracle, and the CPU kernel's candidate cut-back path."""
from __future__ import annotations

import pytest
import torch

import aosae
from aosae.ops import backward as bw
from aosae.ops import extension as _extension
from aosae.ops.gram_topk_sparse import gram_topk_sparse
from oracle import oracle_scores, separated

HAVE_EXT = _extension.available()[0] and hasattr(_extension.load()[0], "gram_topk_backward_cpu")
needs_ext = pytest.mark.skipif(not HAVE_EXT, reason="aosae._C not built with csrc/gram_topk_backward.cpp")
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
PATHS = [pytest.param("scatter", marks=needs_ext), "product", "expand"]
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def _fresh_inputs(seed):
    """Every test draws fresh random inputs (conftest's `seed` reseeds torch and prints it)."""


def make_input(m, n, kind, dtype):
    if kind == "sparse":  # ReLU-like: mostly zero, a few all-zero rows and columns
        a = torch.relu(torch.randn(m, n, dtype=torch.float64) - 1.2)
        a[:, ::7] = 0
        a[::5] = 0
    elif kind == "dense":
        a = torch.randn(m, n, dtype=torch.float64)
    elif kind == "ties":  # small integers: exact in every dtype, many equal scores
        a = torch.randint(-2, 3, (m, n)).double()
    else:
        raise ValueError(kind)
    return a.to(dtype)


def oracle_grad(a, rows, cols, weights, cosine):
    """∂/∂a of Σ_p w_p C[r_p, c_p] for fixed pairs, in float64 through dense autograd."""
    x = a.detach().double().requires_grad_()
    y = x / x.norm(dim=0).clamp_min(1e-300) if cosine else x
    c = y.t() @ y
    valid = rows >= 0
    (c[rows[valid], cols[valid]] * weights[valid].double()).sum().backward()
    return x.grad


def assert_grad_close(got, want, dtype, a, rows, cols, weights, cosine):
    """Relative to the gradient's natural size Σ|w|·max|a| (dot) or Σ|w| / min norm of the
    selected pairs' columns, both sides (cosine): an entry that is exactly 0 in float64 (e.g. a
    cosine gradient with one row) is only 0 up to the rounding of the terms that cancel there."""
    x = a.double()
    valid = rows >= 0
    size = float(weights[valid].double().abs().sum())
    if cosine and bool(valid.any()):
        norms = x.norm(dim=0)[torch.cat([rows[valid], cols[valid]])]
        size /= float(norms[norms > 0].min()) if bool((norms > 0).any()) else 1.0
    elif not cosine:
        size *= float(x.abs().max())
    tol = RTOL[dtype] * max(float(want.abs().max()), size, 1e-30)
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=RTOL[dtype])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("kind", ["sparse", "dense", "ties"])
@pytest.mark.parametrize("m,n,k", [(1, 2, 1), (7, 13, 20), (33, 101, 400), (64, 40, 780)])
def test_dense_op_backward_matches_oracle(path, dtype, cosine, kind, m, n, k):
    a = make_input(m, n, kind, dtype)
    pairs = aosae.gram_topk(a, k, similarity="cosine" if cosine else "dot")
    w = torch.randn(k, dtype=pairs.values.dtype)
    got = bw.gram_topk_backward(w, a, *pairs, cosine, path=path)
    assert got.dtype == dtype and got.shape == a.shape
    want = oracle_grad(a, pairs.rows, pairs.cols, w, cosine)
    assert_grad_close(got, want, dtype, a, pairs.rows, pairs.cols, w, cosine)


@needs_ext
def test_scatter_gives_the_gradient_at_zeros_of_a():
    # a[0, 1] = 0 but its partner column 0 is active in row 0: ∂C_01/∂a_01 = a_00 ≠ 0
    a = torch.tensor([[2.0, 0.0, 0.0], [1.0, 3.0, 0.0]])
    values, rows, cols = aosae.gram_topk(a, 1)
    assert (int(rows[0]), int(cols[0])) == (0, 1)
    got = bw.gram_topk_backward(torch.ones(1), a, values, rows, cols, False, path="scatter")
    torch.testing.assert_close(got, torch.tensor([[0.0, 2.0, 0.0], [3.0, 1.0, 0.0]]))


@needs_ext
@pytest.mark.parametrize("cosine", [False, True])
def test_scatter_and_product_agree_on_every_slot_kind(cosine):
    # k above the non-zero pairs: empty slots (index -1) carry no gradient in either path
    a = make_input(9, 30, "sparse", torch.float64)
    k = 435
    pairs = aosae.gram_topk(a, k, similarity="cosine" if cosine else "dot")
    assert bool((pairs.rows == -1).any())
    w = torch.randn(k, dtype=torch.float64)
    s = bw.gram_topk_backward(w, a, *pairs, cosine, path="scatter")
    p = bw.gram_topk_backward(w, a, *pairs, cosine, path="product")
    # the two paths sum the same terms in different orders: entries that cancel to ~0 differ by
    # ulps of the terms, so the absolute tolerance follows the gradient's scale (a CI draw: 1.6e-12
    # apart at 6e-13; over 400 cosine draws at most 8.3e-14 · max|grad|, up to 7.3e-12 absolute)
    torch.testing.assert_close(s, p, rtol=1e-12, atol=1e-12 * max(float(p.abs().max()), 1.0))


@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 1 << 24])
def test_expand_in_chunks_equals_product(cosine, chunk):
    """The expand path gives the product's gradient, empty slots included, whatever its chunk: a
    chunk ends at a non-zero, and a non-zero with more partners than the chunk goes whole (1: one
    non-zero per chunk; 7: a few; 2²⁴: all at once)."""
    a = make_input(23, 41, "sparse", torch.float64)
    a[:, 3] = torch.rand(23, dtype=torch.float64) + 0.5  # a latent in many pairs: deg > chunk
    k = 41 * 40 // 2  # every pair: the zero columns' pairs leave empty slots
    pairs = aosae.gram_topk(a, k, similarity="cosine" if cosine else "dot")
    assert bool((pairs.rows == -1).any())
    w = torch.randn(k, dtype=torch.float64)
    got = bw.expand_backward(w, a, *pairs, cosine, chunk=chunk)
    want = bw.gram_topk_backward(w, a, *pairs, cosine, path="product")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12 * max(float(want.abs().max()), 1.0))


def test_expand_products_counts_each_non_zero_times_its_partners():
    a = make_input(17, 30, "sparse", torch.float32)
    pairs = aosae.gram_topk(a, 50)
    rows, cols = pairs.rows, pairs.cols
    deg = torch.zeros(30, dtype=torch.int64)
    for r, c in zip(rows.tolist(), cols.tolist()):
        if r >= 0:
            deg[r] += 1
            deg[c] += 1
    want = sum(int(deg[j]) for b in range(17) for j in range(30) if float(a[b, j]) != 0.0)
    assert bw._expand_products(a, rows, cols) == want


def test_cuda_policy_expands_sparse_input_and_multiplies_dense_input():
    """The CUDA choice (tested on CPU tensors: the same arithmetic): sparse activations expand
    (T ≪ the product's 2·m per pair), a dense input takes the product (T = 2·m per pair)."""
    sparse = make_input(64, 200, "sparse", torch.float32)
    sparse[sparse < 0.6] = 0
    dense = torch.rand(64, 200) + 0.1
    for a, want in ((sparse, "expand"), (dense, "product")):
        pairs = aosae.gram_topk(a, 400)
        assert bw._cheaper_of_expand_and_product(a, pairs.rows, pairs.cols) == want
    assert bw.backward_path(sparse) != "expand"  # (CPU: the C++ scatter or the product)


def test_auto_path_follows_density(monkeypatch):
    sparse = torch.zeros(100, 50)
    sparse[::10, ::10] = 1.0
    dense = torch.rand(100, 50) + 0.1
    expected_sparse = "scatter" if HAVE_EXT else "product"
    assert bw.backward_path(sparse) == expected_sparse
    assert bw.backward_path(dense) == "product"
    assert bw.sampled_density(dense) == 1.0


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cosine", [False, True])
def test_dense_op_gradcheck_each_path(monkeypatch, path, cosine):
    # the autograd formula reaches the forced path through the auto policy (CPU never picks expand)
    if path == "expand":
        monkeypatch.setattr(bw, "backward_path", lambda *args: "expand")
    else:
        monkeypatch.setattr(bw, "SCATTER_MAX_DENSITY", 2.0 if path == "scatter" else -1.0)
    while True:  # 7th and 8th scores apart, so finite differences do not flip the selection
        a = torch.relu(torch.randn(6, 9, dtype=torch.float64) + 0.3)
        a[0] = torch.rand(9, dtype=torch.float64) + 0.5  # no zero column: its cosines would jump at ±eps
        c = oracle_scores(a, cosine)
        scores = c.triu(1).abs().flatten().sort(descending=True).values
        if scores[6] - scores[7] > 1e-3:
            break
    a.requires_grad_()

    def f(x):
        return aosae.gram_topk(x, 7, similarity="cosine" if cosine else "dot").values

    assert torch.autograd.gradcheck(f, (a,), eps=1e-6, atol=1e-6)


# ------------------------------------------------------------- gram_topk_sparse's backward


def topk_input(B, n, L, dtype, zeros=True):
    idx = torch.rand(B, n).argsort(dim=1)[:, :L]
    val = torch.rand(B, L, dtype=torch.float64) + 0.05
    if zeros and L:
        val[::3, 0] = 0.0  # kept slots that ReLU zeroed still get their gradient
    return idx, val.to(dtype)


SPARSE_IMPLS = [pytest.param("cpp", marks=needs_ext), "torch"]


@pytest.mark.parametrize("impl", SPARSE_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("B,n,L,k", [(1, 2, 2, 1), (17, 23, 5, 40), (40, 60, 9, 300), (5, 9, 9, 36)])
def test_sparse_op_backward_matches_oracle(impl, dtype, cosine, B, n, L, k):
    idx, val = topk_input(B, n, L, dtype)
    pairs = gram_topk_sparse(idx, val, n, k, similarity="cosine" if cosine else "dot")
    w = torch.randn(k, dtype=pairs.values.dtype)
    got = bw.gram_topk_sparse_backward(w, idx, val, *pairs, n, cosine, impl=impl)
    assert got.dtype == dtype and got.shape == val.shape
    dense = torch.zeros(B, n, dtype=torch.float64).scatter_(1, idx, val.double())
    want = oracle_grad(dense, pairs.rows, pairs.cols, w, cosine).gather(1, idx)
    assert_grad_close(got, want, dtype, dense, pairs.rows, pairs.cols, w, cosine)


@needs_ext
@pytest.mark.parametrize("cosine", [False, True])
def test_sparse_backward_with_a_high_degree_latent(cosine):
    # latent 0 is in every row and pairs with every other latent (a frequent latent: its
    # entries are most of the work), the others each appear once
    B, n = 40, 45
    idx = torch.stack([torch.zeros(B, dtype=torch.long), torch.arange(1, B + 1)], dim=1)
    val = torch.rand(B, 2, dtype=torch.float64) + 0.1
    k = 60
    pairs = gram_topk_sparse(idx, val, n, k, similarity="cosine" if cosine else "dot")
    w = torch.randn(k, dtype=torch.float64)
    got = bw.gram_topk_sparse_backward(w, idx, val, *pairs, n, cosine, impl="cpp")
    want = bw.gram_topk_sparse_backward(w, idx, val, *pairs, n, cosine, impl="torch")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cosine", [False, True])
def test_sparse_op_gradcheck(cosine):
    while True:  # redrawn until the top 6 scores are apart: finite differences must not reorder them
        idx, val = topk_input(7, 12, 4, torch.float64, zeros=False)
        if separated(torch.zeros(7, 12, dtype=torch.float64).scatter_(1, idx, val), 5, cosine):
            break
    val.requires_grad_()
    fn = lambda v: gram_topk_sparse(idx, v, 12, 5, similarity="cosine" if cosine else "dot").values  # noqa: E731
    assert torch.autograd.gradcheck(fn, (val,), eps=1e-6, atol=1e-6)


def test_sparse_op_no_entries():
    idx = torch.zeros(3, 0, dtype=torch.long)
    val = torch.zeros(3, 0, requires_grad=True)
    pairs = gram_topk_sparse(idx, val, 5, 2)
    pairs.values.sum().backward()
    assert val.grad.shape == (3, 0)


# -------------------------------------------- the CPU kernel's candidate cut-back path


def fast_oracle(a, k):
    """The contract's top-k from tests/oracle.py's float64 scores, selected with torch (the
    list-based oracle_topk would sort millions of Python tuples here)."""
    c = oracle_scores(a, False)
    n = c.shape[0]
    i, j = torch.triu_indices(n, n, 1)
    v = c[i, j]
    keep = v != 0
    i, j, v = i[keep], j[keep], v[keep]
    order = torch.argsort(i * n + j, stable=True)  # (row, col) asc, then |value| desc, stable
    i, j, v = i[order], j[order], v[order]
    order = torch.argsort(v.abs(), descending=True, stable=True)[:k]
    return v[order], i[order], j[order]


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the bound is per thread: more threads would each see fewer candidates
    yield
    torch.set_num_threads(before)


@pytest.mark.skipif(not _extension.available()[0], reason="aosae._C not built")
def test_cpu_kernel_cut_back_and_shared_threshold_with_a_low_hint(two_threads):
    # 3 rows of small integers, n = 2900: ~4.2M pairs, ~3/4 with a non-zero score, so each of
    # the (at most 2) threads collects over 2^20 candidates against the near-zero bar of a
    # tiny hint and must cut back and raise the shared threshold (csrc/gram_topk_cpu.cpp:
    # bound = max(2k, 2^20)) before its tiles are done. Many scores tie exactly.
    a = torch.randint(-2, 3, (3, 2900)).float()
    k = 5000
    values, rows, cols = aosae.gram_topk(a, k, backend="cpu", threshold=torch.tensor(1e-30))
    v, i, j = fast_oracle(a, k)
    assert torch.equal(rows, i) and torch.equal(cols, j)
    assert torch.equal(values.double(), v)


@pytest.mark.skipif(not _extension.available()[0], reason="aosae._C not built")
def test_cpu_kernel_cut_back_on_all_equal_scores(two_threads):
    # every pair scores exactly 1: the order is (row, col) ascending, decided only by the
    # cut-back's tie-breaking, across > 2^20 candidates per thread
    a = torch.ones(1, 2900)  # the sampled floor is 0.9: every pair is a candidate
    k = 3000
    values, rows, cols = aosae.gram_topk(a, k, backend="cpu")
    v, i, j = fast_oracle(a, k)
    assert torch.equal(rows, i) and torch.equal(cols, j) and torch.equal(values.double(), v)
    assert int(rows[-1]) == 1 and int(cols[-1]) == 102  # (0, 1..2899), then (1, 2..102)
