"""The Triton primitives of the sparse SAE step (aosae/ops/backends/sparse_coding_triton.py) under
Triton's CPU interpreter, against float64: ragged and empty segments, odd widths spanning several
d tiles, repeated rows, zeros, float16/bfloat16 tables, int32/int64 offsets, strided tables, and
bitwise determinism (tiles here: 4 entries × 8 columns)."""
import os

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'aosae[triton]')")

from aosae.ops.backends import sparse_coding_triton as sc  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the Triton kernels were loaded without the interpreter", allow_module_level=True)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# fp32 accumulation of ≤ 40 terms (inputs are exact in their dtype): a few dozen fp32 ulps of Σ|terms|;
# a dropped or doubled term is off by O(1)
RTOL = 64 * 2.0**-24


@pytest.fixture(autouse=True)
def _interpret(monkeypatch, seed):  # seed: fresh inputs per run, printed on failure
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(sc, "INTERPRETER_CONFIG", (4, 8, 1))  # segments and rows span several tiles


def ragged(lengths, rows):
    """CSR offsets of segments with these lengths, random rows (repeats allowed) and weights with some zeros."""
    lengths = torch.tensor(lengths, dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    nnz = int(offsets[-1])
    idx = torch.randint(0, rows, (nnz,))
    w = torch.randn(nnz)
    w[torch.rand(nnz) < 0.2] = 0.0
    return offsets, idx, w


def segment_ref(offsets, idx, w, table):
    """float64 out[s] = Σ_e w[e] · table[idx[e]] over the inputs as the kernel reads them."""
    S = offsets.numel() - 1
    seg = torch.repeat_interleave(torch.arange(S), offsets[1:] - offsets[:-1])
    out = torch.zeros(S, table.shape[1], dtype=torch.float64)
    return out.index_add_(0, seg, w.double()[:, None] * table.double()[idx])


def assert_close(got, want, scale_terms):
    """fp32 accumulation: error within RTOL of the sum of |terms| per output."""
    assert got.dtype == torch.float32
    assert got.shape == want.shape
    bound = RTOL * scale_terms
    assert bool(((got.double() - want).abs() <= bound).all()), float((got.double() - want).abs().max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 8, 13, 33])
def test_segment_gather_sum_matches_float64(dtype, d):
    lengths = [3, 0, 9, 1, 0, 4, 17, 0]  # empty segments first, inside and last; several entry blocks
    offsets, idx, w = ragged(lengths, rows=6)  # 6 rows for 34 entries: many repeats
    table = torch.randn(6, d).to(dtype)
    table[2] = 0.0
    got = sc.segment_gather_sum(offsets, idx, w.to(dtype), table)
    terms = segment_ref(offsets, idx, w.to(dtype).abs(), table.abs())
    assert_close(got, segment_ref(offsets, idx, w.to(dtype), table), terms)
    assert bool((got[torch.tensor(lengths) == 0] == 0).all())


def test_segment_gather_sum_deterministic_and_longest_first_identical():
    offsets, idx, w = ragged([30, 1, 0, 7, 12], rows=40)
    table = torch.randn(40, 21)
    first = sc.segment_gather_sum(offsets, idx, w, table)
    assert torch.equal(first, sc.segment_gather_sum(offsets, idx, w, table))
    # same entries per segment, same order within it: the launch order changes nothing
    assert torch.equal(first, sc.segment_gather_sum(offsets, idx, w, table, longest_first=False))


def test_segment_gather_sum_index_dtypes_and_strided_table():
    offsets, idx, w = ragged([5, 2, 0, 6], rows=9)
    wide = torch.randn(9, 40)
    table = wide[:, 3:14]  # row stride 40, unit column stride: read in place
    want = segment_ref(offsets, idx, w, table)
    terms = segment_ref(offsets, idx, w.abs(), table.abs())
    assert_close(sc.segment_gather_sum(offsets, idx, w, table), want, terms)
    assert_close(sc.segment_gather_sum(offsets.int(), idx.int(), w, table), want, terms)
    # a transposed view (W_enc.t() for the encoder's input gradient) is gathered from a row-major copy
    transposed = torch.randn(11, 9).t()
    assert_close(sc.segment_gather_sum(offsets, idx, w, transposed), segment_ref(offsets, idx, w, transposed),
                 segment_ref(offsets, idx, w.abs(), transposed.abs()))


def test_segment_gather_sum_nothing_to_sum():
    table = torch.randn(5, 7)
    none = torch.zeros(0, dtype=torch.int64)
    out = sc.segment_gather_sum(torch.zeros(4, dtype=torch.int64), none, torch.zeros(0), table)
    assert out.shape == (3, 7) and bool((out == 0).all())
    assert sc.segment_gather_sum(torch.zeros(1, dtype=torch.int64), none, torch.zeros(0), table).shape == (0, 7)


def test_segment_gather_sum_matches_embedding_bag_decode():
    """A TopK decode: offsets = arange(B+1)·k, the same as torch's embedding_bag."""
    B, k, n, d = 6, 5, 30, 19
    idx = torch.stack([torch.randperm(n)[:k] for _ in range(B)])
    vals = torch.rand(B, k)
    W = torch.randn(n, d)
    got = sc.segment_gather_sum(torch.arange(B + 1) * k, idx.reshape(-1), vals.reshape(-1), W)
    want = torch.nn.functional.embedding_bag(idx, W.double(), per_sample_weights=vals.double(), mode="sum")
    assert_close(got, want, torch.nn.functional.embedding_bag(idx, W.double().abs(), per_sample_weights=vals.double(),
                                                              mode="sum"))


@pytest.mark.parametrize("da,db", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                   (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("d", [1, 13, 24])
def test_gathered_dot_matches_float64(da, db, d):
    nnz = 23  # not a multiple of the 4-entry block
    A, B = torch.randn(5, d).to(da), torch.randn(11, d).to(db)
    B[3] = 0.0
    ra, rb = torch.randint(0, 5, (nnz,)), torch.randint(0, 11, (nnz,))
    got = sc.gathered_dot(ra, rb, A, B)
    want = (A.double()[ra] * B.double()[rb]).sum(1)
    assert_close(got, want, (A.double()[ra] * B.double()[rb]).abs().sum(1))
    assert torch.equal(got, sc.gathered_dot(ra, rb, A, B))


def test_gathered_dot_empty_and_strided():
    A, B = torch.randn(4, 30)[:, 5:20], torch.randn(3, 15)
    assert sc.gathered_dot(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), A, B).shape == (0,)
    ra, rb = torch.tensor([0, 3, 3, 1, 2]), torch.tensor([2, 2, 0, 1, 0])
    want = (A.double()[ra] * B.double()[rb]).sum(1)
    assert_close(sc.gathered_dot(ra.int(), rb, A, B), want, (A.double()[ra] * B.double()[rb]).abs().sum(1))
    Bt = B.t().contiguous().t()  # column-major: copied row-major first
    assert_close(sc.gathered_dot(ra, rb, A, Bt), want, (A.double()[ra] * B.double()[rb]).abs().sum(1))


def test_bad_input_says_what_to_do():
    table = torch.randn(4, 6)
    offsets, idx, w = ragged([2, 1], rows=4)
    with pytest.raises(TypeError, match="int64"):
        sc.segment_gather_sum(offsets.float(), idx, w, table)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        sc.segment_gather_sum(offsets, idx, w.double(), table)
    with pytest.raises(ValueError, match="same length"):
        sc.segment_gather_sum(offsets, idx, w[:-1], table)
    with pytest.raises(ValueError, match="2-D"):
        sc.gathered_dot(idx, idx, table, torch.randn(4, 6, 1))
    with pytest.raises(ValueError, match="same width"):
        sc.gathered_dot(idx, idx, table, torch.randn(4, 5))
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        sc.gathered_dot(idx, idx, table.long(), table)


def test_usable_follows_the_sparse_triton_convention(monkeypatch):
    t = torch.randn(3, 4)
    monkeypatch.setenv(sc.FORCE_ENV, "1")
    assert sc.usable(t) and sc.usable(t.bfloat16())
    assert not sc.usable(t.double()) and not sc.usable(t.long())
    monkeypatch.setenv(sc.FORCE_ENV, "0")
    assert not sc.usable(t)  # CPU without the opt-in: C++ / torch runs there
    monkeypatch.setenv(sc.FORCE_ENV, "1")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not sc.usable(t)


@pytest.mark.parametrize("activation", ["topk", "batchtopk", "relu"])
def test_sparse_step_through_these_kernels_matches_float64(monkeypatch, activation):
    """aosae.ops.sparse_coding's encode/decode autograd, dispatched here as on CUDA (fp32 tensors,
    AOSAE_SPARSE_TRITON=1): loss gradients w.r.t. x (a transposed W_enc table), W_enc, b_enc,
    b_dec and W_dec against the dense float64 step."""
    from aosae.ops import sparse_coding

    monkeypatch.setenv(sc.FORCE_ENV, "1")
    calls = []
    for name in ("segment_gather_sum", "gathered_dot"):
        real = getattr(sc, name)
        monkeypatch.setattr(sc, name, lambda *a, real=real, name=name, **kw: calls.append(name) or real(*a, **kw))
    B, d, n, k = 6, 11, 24, 4
    params = [torch.randn(B, d), torch.randn(d, n), torch.randn(n) * 0.5, torch.randn(d) * 0.1, torch.randn(n, d)]
    x, W_enc, b_enc, b_dec, W_dec = [p.requires_grad_() for p in params]
    latents = sparse_coding.sparse_encode(x, W_enc, b_enc, b_dec, activation, k)
    loss = (sparse_coding.sparse_decode(latents, W_dec, b_dec) - x).pow(2).sum()
    got = torch.autograd.grad(loss, [x, W_enc, b_enc, b_dec, W_dec])
    assert set(calls) == {"segment_gather_sum", "gathered_dot"}

    x, W_enc, b_enc, b_dec, W_dec = [p.detach().double().requires_grad_() for p in params]
    pre = (x - b_dec) @ W_enc + b_enc
    if activation == "topk":
        top = pre.topk(k, dim=1)
        f = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    elif activation == "batchtopk":
        f = torch.where((pre >= pre.flatten().topk(B * k).values[-1]) & (pre > 0), pre, 0.0)
    else:
        f = pre.relu()
    want = torch.autograd.grad(((f @ W_dec + b_dec) - x).pow(2).sum(), [x, W_enc, b_enc, b_dec, W_dec])
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        assert float((g.double() - w).abs().max()) <= 1e-5 * max(float(w.abs().max()), 1.0)
