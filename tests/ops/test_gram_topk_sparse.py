"""The sparse co-activation backend and gram_topk_sparse against the float64 oracle."""
from __future__ import annotations

import pytest
import torch

from aosae import gram_topk
from aosae.ops.backends import reference
from aosae.ops.backends import sparse as sparse_backend
from aosae.ops.gram_topk_sparse import gram_topk_sparse
from oracle import assert_identical, assert_matches_oracle, separated

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@pytest.fixture(autouse=True)
def _fresh_inputs(seed):
    """Every test draws fresh random inputs (conftest's `seed` reseeds torch and prints it)."""


def topk_rows(B, n, L, *, dtype=torch.float32, pool=None, signed=False, integer=False, empty_every=0):
    """TopK-like activations: each row has exactly L distinct latents (from the first `pool`
    latents when given, so pairs repeat across rows). Returns (dense [B, n], indices, values)."""
    pool = n if pool is None else pool
    indices = torch.rand(B, pool).argsort(dim=1)[:, :L]
    if integer:
        values = torch.randint(1, 4, (B, L)).to(torch.float64)
    else:
        values = torch.rand(B, L, dtype=torch.float64) + 0.05
    if signed:
        values = values * (torch.randint(0, 2, (B, L)) * 2 - 1)
    if empty_every:
        values[::empty_every] = 0  # rows with no active latent
    values = values.to(dtype)
    dense = torch.zeros(B, n, dtype=dtype).scatter_(1, indices, values)
    return dense, indices, values


def k_for(n, share=0.05):
    return max(1, int(share * n * (n - 1) / 2))


def cpp_or_skip():
    module = sparse_backend.cpp_module()
    if module is None:
        from aosae.ops import extension as _extension

        pytest.skip(
            "aosae._C has no sparse kernel (not built, or built before csrc/gram_topk_sparse.cpp): "
            f"{_extension.load()[1] or 'rebuild with pip install --no-build-isolation -e .'}"
        )
    return module


def run_impl(impl, a, k, cosine):
    if impl == "cpp":
        return tuple(cpp_or_skip().gram_topk_sparse_cpu(a, k, cosine))
    return sparse_backend.csr_topk_torch(*sparse_backend.dense_to_csr_torch(a), a.shape[1], k, cosine)


@pytest.mark.parametrize("impl", ["cpp", "torch"])
@pytest.mark.parametrize("similarity", ["dot", "cosine"])
@pytest.mark.parametrize("B,n,L", [(40, 37, 1), (30, 53, 4), (24, 127, 16), (12, 200, 64)])
def test_backend_matches_oracle(impl, similarity, B, n, L):
    a, _, _ = topk_rows(B, n, L, signed=True, empty_every=5)
    for k in (1, k_for(n)):
        assert_matches_oracle(run_impl(impl, a, k, similarity == "cosine"), a, k, similarity == "cosine")


@pytest.mark.parametrize("impl", ["cpp", "torch"])
def test_large_l0(impl):
    a, _, _ = topk_rows(3, 1024, 512)
    k = 4000
    assert_matches_oracle(run_impl(impl, a, k, False), a, k)


@pytest.mark.parametrize("impl", ["cpp", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes(impl, dtype):
    a, _, _ = topk_rows(30, 90, 8, dtype=dtype, pool=40, signed=True)
    for cosine in (False, True):
        assert_matches_oracle(run_impl(impl, a, 300, cosine), a, 300, cosine)


@pytest.mark.parametrize("impl", ["cpp", "torch"])
def test_k_larger_than_nonzero_pairs_and_empty_rows(impl):
    a, _, _ = topk_rows(6, 50, 3, empty_every=2)
    k = 50 * 49 // 2  # far more than the ≤ 9 non-zero pairs
    out = run_impl(impl, a, k, False)
    assert_matches_oracle(out, a, k)
    assert int((out[1] >= 0).sum()) <= 9
    zero = torch.zeros(4, 10)
    out = run_impl(impl, zero, 3, True)
    assert torch.equal(out[1], torch.full((3,), -1)) and torch.equal(out[0], torch.zeros(3))


@pytest.mark.parametrize("impl", ["cpp", "torch"])
def test_ties_and_cancellation_are_exact(impl):
    # integer values: every score is exact, so the result must equal the reference bit
    # for bit, including the (row, col) order of ties and pairs that cancel to exactly 0.
    a, _, _ = topk_rows(64, 30, 5, pool=12, signed=True, integer=True)
    for k in (1, 7, 40, 435):
        assert_identical(run_impl(impl, a, k, False), reference.forward(a, k, False))
    # more than 2048 tied candidates: the C++ kernel's radix-sort ordering
    a, _, _ = topk_rows(300, 150, 12, signed=True, integer=True)
    for k in (3000, 11175):
        assert_identical(run_impl(impl, a, k, False), reference.forward(a, k, False))


@pytest.mark.parametrize("impl", ["cpp", "torch"])
@pytest.mark.parametrize("cosine", [False, True])
def test_scores_crowded_in_one_histogram_bin(impl, cosine):
    # The C++ kernel locates the k-th best |C| by a histogram of the top 16 bits of |C|
    # (bins ~0.8 % wide) and settles it inside one bin: put nearly all scores in one bin.
    # (unsigned: a signed pair summing to ~1e-9 may round to exactly 0 in float32 and drop out)
    a, _, _ = topk_rows(400, 90, 2)
    a = torch.where(a != 0, 1 + 1e-3 * a, a)  # a in [1, 1.002)
    for k in (1, 50, 700, 4005):
        assert_matches_oracle(run_impl(impl, a, k, cosine), a, k, cosine)


def outlier_rows(B, n, L, dense_rows, dense_l0, *, signed=False):
    """Sparse TopK-like rows plus a few dense ones (outlier tokens firing on many latents,
    with large activations), as real ReLU SAE batches have. Returns dense [B, n]."""
    a, _, _ = topk_rows(B, n, L, signed=signed, pool=n // 2)
    for t in torch.randperm(B)[:dense_rows].tolist():
        a[t] = 0
        cols = torch.randperm(n)[:dense_l0]
        a[t, cols] = (torch.rand(dense_l0) * 20 + 1) * ((torch.randint(0, 2, (dense_l0,)) * 2 - 1) if signed else 1)
    return a


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("dense_rows,dense_l0", [(1, 300), (4, 200), (7, 500)])
def test_dense_rows_block_matches_oracle(similarity, signed, dense_rows, dense_l0):
    # The C++ kernel sums the densest rows with one GEMM block over the latents they touch
    # and adds the other rows' pairs inside that block to it: same top-k as the oracle.
    module = cpp_or_skip()
    a = outlier_rows(300, 640, 6, dense_rows, dense_l0, signed=signed)
    row_ptr, cols, vals = sparse_backend.dense_to_csr_torch(a)
    moved = module.sparse_dense_rows(row_ptr, cols, vals.float(), a.shape[1])
    assert moved.numel() >= 1 and set(moved.tolist()) <= set((a != 0).sum(1).ge(128).nonzero().flatten().tolist())
    cosine = similarity == "cosine"
    for k in (1, 500, k_for(640)):
        assert_matches_oracle(run_impl("cpp", a, k, cosine), a, k, cosine)


def test_dense_rows_block_exact_on_integers_and_unused_on_sparse_rows():
    module = cpp_or_skip()
    a = outlier_rows(200, 400, 5, 3, 250, signed=True)
    a = a.round()  # integer scores: bit-identical to the reference, ties and cancellations included
    row_ptr, cols, vals = sparse_backend.dense_to_csr_torch(a)
    assert module.sparse_dense_rows(row_ptr, cols, vals.float(), 400).numel() >= 1
    for k in (10, 3000, 79800):
        assert_identical(run_impl("cpp", a, k, False), reference.forward(a, k, False))
    sparse, _, _ = topk_rows(200, 400, 16)
    assert module.sparse_dense_rows(*sparse_backend.dense_to_csr_torch(sparse), 400).numel() == 0


@pytest.mark.parametrize("impl", ["cpp", "torch"])
def test_non_contiguous_input(impl):
    a, _, _ = topk_rows(40, 60, 6)
    t = a.t().contiguous().t()  # same values, column-major strides
    s = torch.cat([a, a], dim=1)[:, ::2]  # strided view
    assert not t.is_contiguous() and not s.is_contiguous()
    for x in (t, s):
        assert_matches_oracle(run_impl(impl, x, 100, False), x, 100)


def test_cpp_and_torch_paths_agree():
    cpp_or_skip()
    a, _, _ = topk_rows(200, 300, 16, pool=150)
    k = 2000
    for cosine in (False, True):
        p, q = run_impl("cpp", a, k, cosine), run_impl("torch", a, k, cosine)
        torch.testing.assert_close(p[0], q[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_op_backend_sparse_forward_and_backward_match_reference(similarity):
    a, _, _ = topk_rows(40, 64, 6, pool=32, signed=True)
    k = 60
    x1 = a.double().requires_grad_()
    x2 = a.double().requires_grad_()
    p = gram_topk(x1, k, similarity=similarity, backend="sparse")
    q = gram_topk(x2, k, similarity=similarity, backend="reference")
    assert torch.equal(p.rows, q.rows) and torch.equal(p.cols, q.cols)
    torch.testing.assert_close(p.values, q.values, rtol=1e-12, atol=1e-12)
    w = torch.randn(k, dtype=torch.float64)
    (p.values * w).sum().backward()
    (q.values * w).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gram_topk_sparse_matches_dense(similarity, dtype):
    dense, idx, val = topk_rows(50, 80, 7, dtype=dtype, pool=40, signed=True, empty_every=9)
    k = 150
    cosine = similarity == "cosine"
    out = gram_topk_sparse(idx, val, 80, k, similarity=similarity)
    assert_matches_oracle(out, dense, k, cosine)


def test_gram_topk_sparse_identical_to_reference_on_exact_values():
    dense, idx, val = topk_rows(64, 40, 6, pool=20, signed=True, integer=True)
    perm = torch.rand(idx.shape).argsort(dim=1)  # any order of the kept latents
    idx, val = idx.gather(1, perm), val.gather(1, perm)
    for k in (1, 25, 780):
        assert_identical(gram_topk_sparse(idx, val, 40, k), gram_topk(dense, k, backend="reference"))


def test_gram_topk_sparse_large_l0_and_int32_indices():
    dense, idx, val = topk_rows(4, 1100, 512)
    out = gram_topk_sparse(idx.int(), val, 1100, 3000)
    assert_matches_oracle(out, dense, 3000)


def test_gram_topk_sparse_non_contiguous():
    dense, idx, val = topk_rows(30, 50, 5)
    idx2 = torch.cat([idx, idx], dim=1)[:, ::2]
    val2 = torch.cat([val, val], dim=1)[:, ::2]
    assert not idx2.is_contiguous()
    assert_matches_oracle(gram_topk_sparse(idx2, val2, 50, 100), dense, 100)


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_gram_topk_sparse_backward_matches_dense_backward(similarity):
    dense, idx, val = topk_rows(30, 40, 6, pool=25, signed=True)
    val[0, 0] = 0.0  # a zero entry still gets its gradient (product rule)
    dense = torch.zeros(30, 40, dtype=val.dtype).scatter_(1, idx, val)
    v = val.double().requires_grad_()
    d = dense.double().requires_grad_()
    k = 30
    p = gram_topk_sparse(idx, v, 40, k, similarity=similarity)
    q = gram_topk(d, k, similarity=similarity, backend="reference")
    assert torch.equal(p.rows, q.rows)
    w = torch.randn(k, dtype=torch.float64)
    (p.values * w).sum().backward()
    (q.values * w).sum().backward()
    torch.testing.assert_close(v.grad, d.grad.gather(1, idx), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_gram_topk_sparse_gradcheck(similarity):
    while True:  # redrawn until the top 7 scores are apart (random signed rows tie often)
        dense, idx, val = topk_rows(8, 15, 4, pool=10, signed=True)
        if separated(dense, 6, similarity == "cosine"):
            break
    val = val.double().requires_grad_()
    fn = lambda v: gram_topk_sparse(idx, v, 15, 6, similarity=similarity).values  # noqa: E731
    assert torch.autograd.gradcheck(fn, (val,), eps=1e-6, atol=1e-7)


def test_gram_topk_sparse_opcheck():
    _, idx, val = topk_rows(10, 20, 4, pool=12)
    for similarity in ("dot", "cosine"):
        v = val.clone().requires_grad_()
        torch.library.opcheck(torch.ops.aosae.gram_topk_sparse.default, (idx, v, 20, 8, similarity))


@pytest.mark.parametrize(
    "indices,values,n,k,error,match",
    [
        (torch.tensor([[0, -1]]), torch.ones(1, 2), 5, 1, ValueError, r"\[0, 5\)"),
        (torch.tensor([[0, 5]]), torch.ones(1, 2), 5, 1, ValueError, r"\[0, 5\)"),
        (torch.tensor([[0, 1]]), torch.ones(1, 3), 5, 1, ValueError, "same shape"),
        (torch.tensor([0, 1]), torch.ones(2), 5, 1, ValueError, r"\[B, L\]"),
        (torch.tensor([[1, 2], [3, 3]]), torch.ones(2, 2), 5, 1, ValueError, "row 1 .*repeats"),
        (torch.tensor([[0, 1]]), torch.tensor([[1.0, float("nan")]]), 5, 1, ValueError, "NaN"),
        (torch.tensor([[0, 1]]), torch.ones(1, 2), 5, 0, ValueError, "k must be"),
        (torch.tensor([[0, 1]]), torch.ones(1, 2), 5, 11, ValueError, "k must be"),
        (torch.tensor([[0, 1]]), torch.ones(1, 2), 1, 1, ValueError, "n_latents"),
        (torch.tensor([[0.0, 1.0]]), torch.ones(1, 2), 5, 1, TypeError, "int64"),
        (torch.tensor([[0, 1]]), torch.ones(1, 2, dtype=torch.int64), 5, 1, TypeError, "float"),
    ],
)
def test_gram_topk_sparse_bad_input(indices, values, n, k, error, match):
    with pytest.raises(error, match=match):
        gram_topk_sparse(indices, values, n, k)


def test_gram_topk_sparse_bad_similarity_and_k_type():
    with pytest.raises(ValueError, match="similarity"):
        gram_topk_sparse(torch.tensor([[0, 1]]), torch.ones(1, 2), 5, 1, similarity="l2")
    with pytest.raises(TypeError, match="k must be an int"):
        gram_topk_sparse(torch.tensor([[0, 1]]), torch.ones(1, 2), 5, 1.0)


def test_cpp_kernel_rejects_bad_csr():
    module = cpp_or_skip()
    row_ptr = torch.tensor([0, 2])
    vals = torch.ones(2)
    with pytest.raises(RuntimeError, match="strictly increasing"):
        module.sparse_csr_topk(row_ptr, torch.tensor([3, 3]), vals, 5, 1, False)
    with pytest.raises(RuntimeError, match="out of"):
        module.sparse_csr_topk(row_ptr, torch.tensor([0, 7]), vals, 5, 1, False)
    with pytest.raises(RuntimeError, match="k must be"):
        module.sparse_csr_topk(row_ptr, torch.tensor([0, 1]), vals, 5, 0, False)


def test_csr_topk_impl_choice():
    with pytest.raises(ValueError, match="impl"):
        sparse_backend.csr_topk(torch.tensor([0]), torch.zeros(0, dtype=torch.int64), torch.zeros(0), 4, 1, False, impl="x")


def test_prefers_follows_density():
    dense_like = torch.rand(64, 256)  # every entry non-zero: dense work is far cheaper
    assert not sparse_backend.prefers(dense_like)
    topk_like, _, _ = topk_rows(256, 8192, 8)  # L0 = 8 of 8192: Σ L0² ≪ m·n²
    assert sparse_backend.prefers(topk_like)
    pred = sparse_backend.predicted_ms(topk_like)
    assert pred["pairs"] == pytest.approx(256 * 8 * 7 / 2)


def test_prefers_counts_outlier_rows_as_the_gemm_block():
    cpp_or_skip()
    a, _, _ = topk_rows(512, 4096, 8)
    for t in (0, 200, 400):  # even rows: in the strided sample
        a[t, torch.randperm(4096)[:3000]] = 5.0
    pred = sparse_backend.predicted_ms(a)
    assert pred["pairs"] == pytest.approx((256 - 3) * 2 * 8 * 7 / 2)  # sample of every 2nd row; outliers go to the block
    assert sparse_backend.prefers(a)  # pair by pair they would cost more than the dense kernel
    assert 3 * 3000 * 2999 / 2 * sparse_backend.cpp_costs()["pair"] * 1e-6 > pred["dense"]
    at_init = torch.relu(torch.randn(256, 10000))  # L0 ≈ n/2 everywhere: too wide for the block
    assert not sparse_backend.prefers(at_init)
