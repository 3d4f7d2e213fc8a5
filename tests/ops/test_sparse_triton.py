"""The Triton sparse path (the GPU's sparse backend) under Triton's CPU interpreter: the same
pairs as the float64 oracle, and the same gradient as the torch sparse backward, on random,
tied, zero, TopK-padded and wide inputs; rows spanning several tiles (BLOCK 16 here)."""
import os

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'aosae[triton]')")

from aosae.ops.backends import sparse, sparse_triton  # noqa: E402
from aosae.ops.backward import gram_topk_sparse_backward, sparse_backward_torch  # noqa: E402
from oracle import assert_identical, assert_matches_oracle  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the Triton kernels were loaded without the interpreter", allow_module_level=True)


@pytest.fixture(autouse=True)
def _interpret(monkeypatch, seed):  # seed: fresh inputs per run, printed on failure
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def sparse_rows(B, n, max_l0, dtype=torch.float32):
    """[B, n] with 0..max_l0 random non-zeros per row."""
    a = torch.zeros(B, n)
    for t in range(B):
        l0 = int(torch.randint(0, max_l0 + 1, ()))
        a[t, torch.randperm(n)[:l0]] = torch.randn(l0)
    return a.to(dtype)


def run_csr(a, k, cosine):
    row_ptr, cols, vals = sparse.dense_to_csr_torch(a, keep_dtype=True)
    return sparse_triton.csr_topk(row_ptr, cols, vals, a.shape[1], k, cosine)


def topk_rows(B, n, L, zero_share=0.2):
    """TopK-style (indices, values) [B, L]: distinct latents per row, unsorted, some values 0."""
    idx = torch.stack([torch.randperm(n)[:L] for _ in range(B)])
    vals = torch.randn(B, L)
    vals[torch.rand(B, L) < zero_share] = 0.0
    return idx, vals


@pytest.mark.parametrize("B,n,max_l0", [(1, 2, 2), (7, 50, 5), (9, 131, 40), (33, 64, 17)])
@pytest.mark.parametrize("cosine", [False, True])
def test_csr_matches_oracle(B, n, max_l0, cosine):
    a = sparse_rows(B, n, max_l0)
    for k in sorted({1, 10, n * (n - 1) // 2}):
        assert_matches_oracle(run_csr(a, k, cosine), a, k, cosine)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtypes(dtype):
    a = sparse_rows(12, 60, 20, dtype)
    for cosine in (False, True):
        pairs = run_csr(a, 90, cosine)
        assert pairs[0].dtype == torch.float32
        assert_matches_oracle(pairs, a, 90, cosine)


def test_ties_are_ordered_by_row_and_col():
    # small integers: many exactly equal scores, all sums exact in fp32
    a = sparse_rows(30, 40, 12)
    a = torch.where(a != 0, torch.randint(1, 3, a.shape).float() * a.sign(), a)
    for cosine in (False, True):
        assert_matches_oracle(run_csr(a, 300, cosine), a, 300, cosine)


def test_zeros_and_padding():
    a = torch.zeros(5, 30)
    values, rows, cols = run_csr(a, 7, False)
    assert torch.equal(rows, torch.full((7,), -1)) and torch.equal(values, torch.zeros(7))
    a[2, 3], a[2, 9], a[4, 3] = 1.0, -2.0, 5.0  # one non-zero pair: the rest padded
    assert_matches_oracle(run_csr(a, 7, False), a, 7, False)
    assert_matches_oracle(run_csr(a, 7, True), a, 7, True)


def test_deterministic():
    a = sparse_rows(25, 80, 30)
    assert_identical(run_csr(a, 200, False), run_csr(a, 200, False))


@pytest.mark.parametrize("cosine", [False, True])
def test_topk_padded_matches_oracle_with_zero_slots(cosine):
    idx, vals = topk_rows(10, 90, 23)
    dense = torch.zeros(10, 90).scatter_(1, idx, vals)
    for k in (1, 60, 90 * 89 // 2):
        assert_matches_oracle(sparse_triton.padded_topk(idx, vals, 90, k, cosine), dense, k, cosine)


def test_wide_keys_take_the_int64_path():
    n = 70000  # i·n + j no longer fits an int32: 64-bit keys
    assert not sparse_triton._key32(n, False) and sparse_triton._key32(65536, False)
    assert not sparse_triton._key32(65536, True)  # the diagonal (65535, 65535) would hit the sentinel
    idx, vals = topk_rows(6, n, 9, zero_share=0.0)
    idx[:, 0] = n - 1  # the largest keys
    pairs = sparse_triton.padded_topk(idx, vals, n, 50, False)
    dense = torch.zeros(6, n).scatter_(1, idx, vals)
    keep = torch.unique(idx)  # the oracle on the touched columns only (n² is too big)
    sub = sparse_triton.padded_topk(torch.searchsorted(keep, idx), vals, keep.numel(), 50, False)
    assert torch.equal(pairs[0], sub[0])  # column ranks keep every order: the same result
    assert torch.equal(pairs[1][pairs[1] >= 0], keep[sub[1][sub[1] >= 0]])
    assert torch.equal(pairs[2][pairs[2] >= 0], keep[sub[2][sub[2] >= 0]])
    assert_matches_oracle(sub, dense[:, keep], 50, False)


def test_tile_decode_covers_each_row_triangle():
    q = torch.arange(200_000)
    i, j = sparse_triton._tri_decode(q)
    assert bool((i <= j).all()) and bool((i >= 0).all())
    assert torch.equal(j * (j + 1) // 2 + i, q)


@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_matches_torch_sparse_backward(cosine, dtype):
    idx, vals = topk_rows(6, 70, 21)  # 21 > BLOCK: each row spans two blocks
    vals = vals.to(dtype)
    for k in (5, 70 * 69 // 2):
        out = sparse_triton.padded_topk(idx, vals, 70, k, cosine)
        g = torch.randn(k)
        got = gram_topk_sparse_backward(g, idx, vals, *out, 70, cosine, impl="triton")
        want = sparse_backward_torch(g, idx, vals, *out, 70, cosine)
        assert got.dtype == dtype and got.shape == vals.shape
        # float32: two summation orders of cancelling cosine terms differ by ~2e-5 of the largest entry
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got.float(), want.float(), atol=tol * float(want.abs().max().clamp_min(1)), rtol=0)


def test_gradient_through_csr_matches_dense_autograd():
    a = sparse_rows(16, 50, 14).double()
    k = 40
    row_ptr, cols, vals = sparse.dense_to_csr_torch(a.float(), keep_dtype=True)
    out = sparse_triton.csr_topk(row_ptr, cols, vals, 50, k, False)
    g = torch.randn(k)
    grad = sparse_triton.support_grad(row_ptr, cols, vals, 50, g, *out, False)
    # dense reference: ∂/∂a of Σ g_p a_r·a_c at the non-zeros of a
    x = a.clone().requires_grad_()
    r, c = out[1].clamp_min(0), out[2].clamp_min(0)
    ((x[:, r] * x[:, c]).sum(0) * torch.where(out[1] >= 0, g.double(), 0.0)).sum().backward()
    t, cc = torch.nonzero(a, as_tuple=True)
    torch.testing.assert_close(grad.double(), x.grad[t, cc], atol=1e-5, rtol=1e-5)


def test_csr_topk_dispatch_rejects_float64_for_triton():
    row_ptr, cols, vals = sparse.dense_to_csr_torch(sparse_rows(4, 10, 4).double())
    with pytest.raises(RuntimeError, match="float16/bfloat16/float32"):
        sparse.csr_topk(row_ptr, cols, vals, 10, 3, False, impl="triton")
    out = sparse.csr_topk(row_ptr, cols, vals.float(), 10, 3, False, impl="triton")
    assert out[0].dtype == torch.float32


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_on_support_through_triton_matches_gram_topk_gradient(monkeypatch, similarity):
    """gram_topk_on_support's GPU path (CSR by torch, the Triton forward and backward), run here
    on CPU tensors through the interpreter: the SAE's gradient through a ReLU equals gram_topk's."""
    from aosae.ops import gram_topk_support
    from aosae.ops.gram_topk import gram_topk

    monkeypatch.setenv(sparse_triton.FORCE_ENV, "1")  # the GPU path on CPU tensors
    pre = torch.randn(24, 45)
    pre[0] += 2.0  # an outlier row firing on most latents
    k, grads, selections = 50, [], []
    for op in (gram_topk, gram_topk_support.gram_topk_on_support):
        p = pre.clone().requires_grad_()
        a = torch.relu(p - 1.0)
        x_hat = a @ torch.ones(45, 3)  # the decoder: autograd adds the sparse gradient into its dense one
        pairs = op(a, k, similarity=similarity, backend="sparse")
        (x_hat.pow(2).sum() + (pairs.values.abs() * torch.linspace(1, 2, k)).sum()).backward()
        grads.append(p.grad)
        selections.append(pairs)
    for got, want in zip(selections[1], selections[0]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_public_ops_route_through_triton_when_asked(monkeypatch, similarity):
    """AOSAE_SPARSE_TRITON=1 sends CPU tensors down the GPU's route: gram_topk(backend="sparse")
    (CSR), gram_topk_sparse (rows read in place) and its backward; same results as the reference."""
    import aosae
    from aosae.ops import gram_topk_sparse as sparse_op

    idx, vals = topk_rows(8, 50, 12)
    dense = torch.zeros(8, 50).scatter_(1, idx, vals)
    calls = []
    monkeypatch.setattr(sparse_op.sparse_triton, "padded_topk",
                        lambda *a, _f=sparse_triton.padded_topk: calls.append("padded") or _f(*a))
    monkeypatch.setenv(sparse_triton.FORCE_ENV, "1")
    assert_matches_oracle(aosae.gram_topk(dense, 60, similarity=similarity, backend="sparse"), dense, 60,
                          similarity == "cosine")
    x = vals.clone().requires_grad_()
    pairs = aosae.gram_topk_sparse(idx, x, 50, 60, similarity=similarity)
    assert calls == ["padded"]
    assert_matches_oracle(pairs, dense, 60, similarity == "cosine")
    (grad,) = torch.autograd.grad(pairs.values.abs().sum(), x)
    # the same selection's gradient by the torch path (near-tied cosines may select differently
    # from the reference's)
    want = sparse_backward_torch(pairs.values.detach().sign(), idx, vals, *(t.detach() for t in pairs), 50, similarity == "cosine")
    torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@pytest.mark.parametrize("cosine", [False, True])
def test_long_runs_span_chunks_and_blocks(cosine):
    # 3 latents on every one of 150 rows: runs of 150 equal keys, over many reduce blocks and
    # CHUNK-sized steps; plus sparse noise so the runs start at odd offsets
    a = sparse_rows(150, 40, 3)
    a[:, [5, 17, 33]] = torch.rand(150, 3) + 0.5
    assert_matches_oracle(run_csr(a, 100, cosine), a, 100, cosine)


def test_tiny_activations_keep_a_finite_cosine():
    a = torch.zeros(4, 6)
    a[0, 1], a[0, 2] = 1e-20, 1e-20  # squares underflow to subnormals: cosine 1, not inf
    a[1, 3], a[1, 4] = 1.0, 2.0
    values, rows, cols = run_csr(a, 3, True)
    assert bool(torch.isfinite(values).all())
    assert_matches_oracle((values, rows, cols), a, 3, True)


@pytest.mark.parametrize("K", [1, 7, 300])
def test_lookup_table_is_linear_probing_without_atomics(K):
    """The backward's table: every key once, at or after its home slot with every slot between
    occupied (so a probe from the home finds it), the skipped keys (−1) nowhere, and the same
    layout every call (no atomics: nothing depends on the order programs run in)."""
    from aosae.kernels import sparse_pairs as kern

    keys = torch.randperm(10**6)[:K].long() * 4099 + 17  # distinct, spread like i·n + j
    keys[torch.rand(K) < 0.2] = -1
    g = torch.randn(K)
    table_keys, table_g, bits = sparse_triton._lookup_table(keys, g)
    home = torch.empty(K, dtype=torch.int64)
    kern._table_home_kernel[(1,)](keys, K, home, (1 << bits) - 1, SHIFT=64 - bits, BLOCK=512)
    valid = keys >= 0
    assert bool((home[valid] < 1 << bits).all()) and bool((home[~valid] == 1 << bits).all())
    for key, h, gk in zip(keys[valid].tolist(), home[valid].tolist(), g[valid].tolist()):
        at = h
        while int(table_keys[at]) != key:
            assert int(table_keys[at]) != -1, "a probe from the home slot met an empty slot first"
            at += 1
        assert float(table_g[at]) == gk
    assert int((table_keys >= 0).sum()) == int(valid.sum())
    again = sparse_triton._lookup_table(keys, g)
    assert torch.equal(again[0], table_keys) and torch.equal(again[1], table_g)
