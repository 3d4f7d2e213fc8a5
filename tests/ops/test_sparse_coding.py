"""The sparse SAE step's primitives and autograd against the dense float64 reference."""
import pytest
import torch

from aosae.ops import sparse_coding as sc
from aosae.ops import sparse_coding_reference as ref


def ragged(counts, n, dtype=torch.float64):
    """CSR rows with the given lengths, distinct random latents per row, random values."""
    offsets = torch.zeros(len(counts) + 1, dtype=torch.long)
    offsets[1:] = torch.tensor(counts, dtype=torch.long).cumsum(0)
    indices = torch.cat([torch.randperm(n)[:c] for c in counts]) if sum(counts) else torch.zeros(0, dtype=torch.long)
    return offsets, indices, torch.randn(int(offsets[-1]), dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("counts", [[3, 0, 5, 1, 0, 7], [0, 0, 0], [1], [4] * 9])
def test_segment_gather_sum_matches_reference(seed, dtype, counts):
    offsets, idx, w = ragged(counts, 11, dtype)
    table = torch.randn(11, 13, dtype=dtype)
    got = sc.segment_gather_sum(offsets, idx, w, table)
    want = ref.segment_gather_sum(offsets, idx, w, table)
    assert got.shape == (len(counts), 13) and got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got[torch.tensor(counts) == 0] == 0).all()  # empty segments are zero rows


@pytest.mark.parametrize("grouped", [True, False])
def test_gathered_dot_matches_reference(seed, grouped):
    offsets, cols, _ = ragged([2, 0, 6, 3, 1], 17)
    rows = sc.token_of_entry(offsets, cols.numel())
    if not grouped:
        perm = torch.randperm(rows.numel())
        rows, cols = rows[perm], cols[perm]
    A, B = torch.randn(5, 9, dtype=torch.float64), torch.randn(17, 9, dtype=torch.float64)
    got = sc.gathered_dot(rows, cols, A, B)
    torch.testing.assert_close(got, ref.gathered_dot(rows, cols, A, B))
    assert sc.gathered_dot(rows[:0], cols[:0], A, B).shape == (0,)
    assert sc.gathered_dot(rows, cols, A.float(), B.float()).dtype == torch.float32


def test_primitives_reject_bad_input():
    offsets, idx, w = ragged([2, 3], 5)
    with pytest.raises(TypeError, match="gather_idx"):
        sc.segment_gather_sum(offsets, idx.double(), w, torch.randn(5, 3))
    with pytest.raises(TypeError, match="weights"):
        sc.segment_gather_sum(offsets, idx, w[:-1], torch.randn(5, 3))
    with pytest.raises(TypeError, match="table"):
        sc.segment_gather_sum(offsets, idx, w, torch.randn(5))
    with pytest.raises(ValueError, match="same width"):
        sc.gathered_dot(idx, idx, torch.randn(5, 3), torch.randn(5, 4))


def _sae(d=7, n=29, dtype=torch.float64):
    params = [torch.randn(d, n, dtype=dtype), torch.randn(n, dtype=dtype) * 0.3, torch.randn(d, dtype=dtype),
              torch.randn(n, d, dtype=dtype)]
    return [p.requires_grad_() for p in params]


CASES = [("topk", 4, None), ("batchtopk", 3, None), ("relu", None, None), ("jumprelu", None, 0.8)]


@pytest.mark.parametrize("activation, k, threshold", CASES)
def test_sparse_encode_decode_matches_dense_reference(seed, activation, k, threshold):
    W_enc, b_enc, b_dec, W_dec = params = _sae()
    x = torch.randn(13, 7, dtype=torch.float64, requires_grad=True)
    lat, pre = sc.sparse_encode(x, W_enc, b_enc, b_dec, activation, k, threshold, return_pre=True)
    x_hat = sc.sparse_decode(lat, W_dec, b_dec)
    f, x_hat_ref = ref.encode_decode(x, W_enc, b_enc, b_dec, W_dec, activation, k, threshold)
    torch.testing.assert_close(lat.to_dense(), f)
    torch.testing.assert_close(x_hat, x_hat_ref)
    torch.testing.assert_close(pre, (x - b_dec) @ W_enc + b_enc)
    # every row lists distinct latents in range
    rows = lat.rows()
    assert torch.unique(rows * 29 + lat.indices).numel() == lat.indices.numel()
    assert lat.offsets[0] == 0 and lat.offsets[-1] == lat.values.numel() and (lat.offsets.diff() >= 0).all()
    if activation == "batchtopk":
        assert lat.values.numel() <= 13 * k and (lat.values > 0).all()
    # loss = recon + L1 + a term on the dense pre-activations (its gradient is added densely)
    w = torch.randn(29, dtype=torch.float64)
    loss = (x - x_hat).pow(2).sum() + 0.1 * lat.values.abs().sum() + (pre.tanh() * w).sum()
    pre_ref = (x - b_dec) @ W_enc + b_enc
    loss_ref = (x - x_hat_ref).pow(2).sum() + 0.1 * f.abs().sum() + (pre_ref.tanh() * w).sum()
    got = torch.autograd.grad(loss, [x, *params])
    want = torch.autograd.grad(loss_ref, [x, *params])
    for name, a, b in zip(["x", "W_enc", "b_enc", "b_dec", "W_dec"], got, want):
        torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("activation, k, threshold", CASES)
def test_sparse_gradients_without_pre_and_frozen_inputs(seed, activation, k, threshold):
    W_enc, b_enc, b_dec, W_dec = params = _sae()
    x = torch.randn(6, 7, dtype=torch.float64)  # x without grad: the usual training case
    lat = sc.sparse_encode(x, W_enc, b_enc, b_dec, activation, k, threshold)
    loss = (x - sc.sparse_decode(lat, W_dec, b_dec)).pow(2).sum()
    f, x_hat_ref = ref.encode_decode(x, W_enc, b_enc, b_dec, W_dec, activation, k, threshold)
    want = torch.autograd.grad((x - x_hat_ref).pow(2).sum(), params)
    for a, b in zip(torch.autograd.grad(loss, params), want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("tile", [1, 3, 8, 28])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiled_topk_keeps_the_products_top_k(seed, tile, dtype):
    """tiled_topk against the whole product's topk: the same k values per row, each the product's
    entry at its own latent, distinct latents; tiles narrower than k, a last tile narrower than
    the others, and ties across tiles (columns 20–28 repeat 10–18)."""
    centered = torch.randn(11, 7, dtype=dtype)
    W_enc, b_enc = torch.randn(7, 29, dtype=dtype), torch.randn(29, dtype=dtype)
    W_enc[:, 20:], b_enc[20:] = W_enc[:, 10:19], b_enc[10:19]
    pre = torch.addmm(b_enc, centered, W_enc)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-6)
    for k in (1, 4, 29):
        values, indices = sc.tiled_topk(centered, W_enc, b_enc, k, tile)
        assert values.shape == indices.shape == (11, k) and values.dtype == dtype
        torch.testing.assert_close(values.sort(1, descending=True).values, pre.topk(k, dim=1).values, **tol)
        torch.testing.assert_close(pre.gather(1, indices), values, **tol)
        assert all(torch.unique(row).numel() == k for row in indices)
        kept = torch.full((11, min(tile, 29)), float("nan"), dtype=dtype)  # a buffer kept between calls
        again = sc.tiled_topk(centered, W_enc, b_enc, k, tile, kept)
        assert torch.equal(again[0], values) and torch.equal(again[1], indices)


_tiled_topk = sc.tiled_topk  # (the function itself, before a test patches the module's name)


@pytest.mark.parametrize("tile", [5, 28])
def test_topk_without_pre_selects_in_tiles(seed, monkeypatch, tile):
    """TopK wider than TOPK_TILE (made small here), pre-activations not asked for: the selection
    comes from tiled_topk, with the same latents and float64 gradients as the whole product's."""
    W_enc, b_enc, b_dec, W_dec = params = _sae()
    x = torch.randn(13, 7, dtype=torch.float64)
    want_lat, _ = sc.sparse_encode(x, W_enc, b_enc, b_dec, "topk", 4, return_pre=True)  # (pre asked for: whole)
    want = torch.autograd.grad((x - sc.sparse_decode(want_lat, W_dec, b_dec)).pow(2).sum(), params)
    calls = []
    monkeypatch.setattr(sc, "TOPK_TILE", tile)
    monkeypatch.setattr(sc, "tiled_topk", lambda *a: calls.append(a[-1]) or _tiled_topk(*a))
    lat = sc.sparse_encode(x, W_enc, b_enc, b_dec, "topk", 4)
    assert calls == [tile]
    assert torch.equal(lat.offsets, want_lat.offsets) and torch.equal(lat.indices, want_lat.indices)
    torch.testing.assert_close(lat.values, want_lat.values, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad((x - sc.sparse_decode(lat, W_dec, b_dec)).pow(2).sum(), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_empty_rows_and_an_empty_batch(seed):
    W_enc, b_enc, b_dec, W_dec = _sae()
    x = torch.randn(8, 7, dtype=torch.float64)
    x[::2] = b_dec.detach()  # these rows see pre = b_enc only
    with torch.no_grad():
        b_enc.copy_(-torch.rand(29, dtype=torch.float64) - 0.1)
    lat = sc.sparse_encode(x, W_enc, b_enc, b_dec, "relu")
    assert (lat.offsets.diff()[::2] == 0).all()
    torch.testing.assert_close(sc.sparse_decode(lat, W_dec, b_dec)[::2], b_dec.detach().expand(4, 7))
    # nothing kept at all: the decode is b_dec, the encoder gets zero gradients
    none = sc.sparse_encode(x, W_enc, b_enc, b_dec, "jumprelu", threshold=1e9)
    assert none.values.numel() == 0 and none.l0().sum() == 0
    loss = sc.sparse_decode(none, W_dec, b_dec).sum() + none.values.sum()
    g_w, g_b = torch.autograd.grad(loss, [W_enc, b_enc])
    assert (g_w == 0).all() and (g_b == 0).all()


def test_topk_zero_slots_pass_no_gradient(seed):
    W_enc, b_enc, b_dec, W_dec = _sae(n=12)
    with torch.no_grad():
        b_enc.sub_(5.0)  # most kept slots are ReLU'd to 0
    x = torch.randn(5, 7, dtype=torch.float64)
    lat = sc.sparse_encode(x, W_enc, b_enc, b_dec, "topk", 6)
    assert (lat.offsets == torch.arange(6) * 6).all() and (lat.values == 0).any()
    (g,) = torch.autograd.grad(lat.values.sum(), b_enc)
    f, _ = ref.encode_decode(x, W_enc, b_enc, b_dec, W_dec, "topk", 6)
    torch.testing.assert_close(g, torch.autograd.grad(f.sum(), b_enc)[0])
    assert int(lat.l0().sum()) == int((f != 0).sum())


def test_batchtopk_keeps_the_batch_top_k(seed):
    pre = torch.randn(10, 40, dtype=torch.float64) + 1.0
    offsets, idx, values = sc.select(pre, "batchtopk", 5)
    assert values.numel() == 50 and offsets[-1] == 50
    assert float(values.min()) >= float(pre.reshape(-1).topk(50).values[-1])
    counts = offsets.diff()
    assert counts.max() > counts.min()  # ragged rows
    for t in range(10):
        row = idx[offsets[t]:offsets[t + 1]]
        assert (row.diff() > 0).all()  # ascending, distinct


def test_encode_rejects_bad_arguments():
    W_enc, b_enc, b_dec, _ = _sae()
    x = torch.randn(3, 7, dtype=torch.float64)
    with pytest.raises(ValueError, match="activation"):
        sc.sparse_encode(x, W_enc, b_enc, b_dec, "gelu")
    with pytest.raises(ValueError, match="needs an int k"):
        sc.sparse_encode(x, W_enc, b_enc, b_dec, "topk")
    with pytest.raises(ValueError, match="threshold"):
        sc.sparse_encode(x, W_enc, b_enc, b_dec, "jumprelu")
    with pytest.raises(ValueError, match="shapes"):
        sc.sparse_encode(x[:, :5], W_enc, b_enc, b_dec, "relu")


def test_group_by_is_a_stable_grouping(seed):
    keys = torch.randint(0, 13, (500,))
    order, offsets = sc.group_by(keys, 13)
    assert torch.equal(order, torch.argsort(keys, stable=True))
    assert torch.equal(offsets[1:], torch.bincount(keys, minlength=13).cumsum(0)) and offsets[0] == 0
    order, offsets = sc.group_by(keys[:0], 4)
    assert order.numel() == 0 and torch.equal(offsets, torch.zeros(5, dtype=torch.long))


def test_group_by_rejects_keys_out_of_range():
    from aosae.ops import extension

    if not hasattr(extension.load()[0], "group_by_key"):
        pytest.skip("aosae._C without group_by_key: torch.argsort groups (no range check of its own)")
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        sc.group_by(torch.tensor([0, 4, 1]), 4)


@pytest.mark.parametrize("column_major", [False, True])
def test_encoder_gradient_comes_in_the_parameters_layout(seed, column_major):
    W_enc, b_enc, b_dec, _ = _sae()
    if column_major:
        W_enc = W_enc.detach().t().contiguous().t().requires_grad_()
    x = torch.randn(9, 7, dtype=torch.float64)
    lat = sc.sparse_encode(x, W_enc, b_enc, b_dec, "topk", 3)
    (g,) = torch.autograd.grad(lat.values.sum(), W_enc)
    assert g.stride() == W_enc.stride()
    f, _ = ref.encode_decode(x, W_enc, b_enc, b_dec, torch.zeros(29, 7, dtype=torch.float64), "topk", 3)
    torch.testing.assert_close(g, torch.autograd.grad(f.sum(), W_enc)[0])


def test_relu_dense_phase_counts_without_an_int64_mask():
    """The ReLU count against max_nnz allocates no int64 [B, n] copy of the mask: the forward
    allocates pre (4 bytes an entry in fp32) and the mask (1 byte), not 8 bytes more an entry."""
    from torch.profiler import ProfilerActivity, profile

    b, d, n = 64, 8, 2048
    x, W_enc = torch.randn(b, d), torch.randn(d, n)
    b_enc, b_dec = torch.zeros(n), torch.zeros(d)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        lat, pre = sc.sparse_encode(x, W_enc, b_enc, b_dec, "relu", return_pre=True, max_nnz=10)
    assert lat is None  # ≈ half of the entries are positive: the dense phase
    allocated = sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)
    assert allocated < 8 * b * n, f"{allocated} bytes allocated for a [{b}, {n}] forward"
    # the count itself is unchanged: the same latents where the limit is not reached
    lat = sc.sparse_encode(x, W_enc, b_enc, b_dec, "relu", max_nnz=int((pre > 0).sum()))
    assert lat is not None and lat.values.numel() == int((pre > 0).sum())
    assert sc.sparse_encode(x, W_enc, b_enc, b_dec, "relu", max_nnz=int((pre > 0).sum()) - 1) is None
