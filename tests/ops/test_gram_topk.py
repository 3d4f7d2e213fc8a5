"""gram_topk: the reference and the fused C++ CPU backend against a float64 oracle."""
from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import aosae
from aosae.ops import backends
from aosae.ops import extension as _extension
from oracle import assert_identical, assert_matches_oracle, oracle_topk

HAVE_EXT = _extension.available()[0]
BACKENDS = [
    "reference",
    pytest.param("cpu", marks=pytest.mark.skipif(not HAVE_EXT, reason="aosae._C not built")),
]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SIMILARITIES = list(aosae.ops.gram_topk.SIMILARITIES)


def random_input(m, n, dtype, kind="randn"):
    if kind == "randn":
        a = torch.randn(m, n, dtype=torch.float64)
    elif kind == "relu":  # SAE-like: non-negative, mostly zero
        a = torch.relu(torch.randn(m, n, dtype=torch.float64) - 1.0)
    elif kind == "ints":  # exact in every dtype: produces exact ties
        a = torch.randint(-2, 3, (m, n)).double()
    else:
        raise ValueError(kind)
    return a.to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize(
    "m,n,k",
    [(1, 2, 1), (1, 3, 3), (4, 3, 2), (16, 127, 50), (3, 127, 8001), (64, 1000, 2500), (33, 300, 1)],
)
def test_matches_oracle(seed, backend, dtype, similarity, m, n, k):
    k = min(k, n * (n - 1) // 2)
    a = random_input(m, n, dtype, "relu" if n == 1000 else "randn")
    pairs = aosae.gram_topk(a, k, similarity=similarity, backend=backend)
    assert_matches_oracle(pairs, a, k, similarity == "cosine")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_ties_are_ordered_by_row_then_col(seed, backend, dtype, similarity):
    # values in {-2..2}: many pairs share a score, and every dtype represents them exactly
    a = random_input(9, 40, dtype, "ints")
    k = 300
    pairs = aosae.gram_topk(a, k, similarity=similarity, backend=backend)
    assert_matches_oracle(pairs, a, k, similarity == "cosine")
    if similarity == "dot":  # integer Gram entries are exact: the order must match exactly
        top, _ = oracle_topk(a, k)
        got = list(zip(pairs.rows.tolist(), pairs.cols.tolist()))
        want = [(i, j) for _, i, j, _ in top] + [(-1, -1)] * (k - len(top))
        assert got == want


def test_all_equal_scores_pick_smallest_indices():
    a = torch.ones(4, 6)  # every pair scores 4
    for backend in ["reference"] + (["cpu"] if HAVE_EXT else []):
        pairs = aosae.gram_topk(a, 4, backend=backend)
        assert pairs.rows.tolist() == [0, 0, 0, 0]
        assert pairs.cols.tolist() == [1, 2, 3, 4]
        assert pairs.values.tolist() == [4.0] * 4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_all_zero_input_gives_empty_slots(backend, similarity):
    pairs = aosae.gram_topk(torch.zeros(5, 7), 10, similarity=similarity, backend=backend)
    assert pairs.values.tolist() == [0.0] * 10
    assert pairs.rows.tolist() == [-1] * 10 and pairs.cols.tolist() == [-1] * 10


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_k_larger_than_nonzero_pairs(seed, backend, similarity):
    a = torch.zeros(32, 50)
    a[:, [3, 17, 18, 40]] = torch.randn(32, 4)  # 4 live columns: 6 non-zero pairs
    k = 20
    pairs = aosae.gram_topk(a, k, similarity=similarity, backend=backend)
    assert_matches_oracle(pairs, a, k, similarity == "cosine")
    assert int((pairs.rows >= 0).sum()) == 6
    assert set(pairs.rows[:6].tolist()) | set(pairs.cols[:6].tolist()) == {3, 17, 18, 40}


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_correlations_keep_their_sign(seed, backend):
    base = torch.randn(64, 5)
    a = torch.cat([base, -base], dim=1)  # column i + 5 is the negation of column i
    pairs = aosae.gram_topk(a, 5, similarity="cosine", backend=backend)
    assert_matches_oracle(pairs, a, 5, True)
    torch.testing.assert_close(pairs.values, -torch.ones(5), atol=1e-5, rtol=0)
    assert sorted(zip(pairs.rows.tolist(), pairs.cols.tolist())) == [(i, i + 5) for i in range(5)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(seed, backend):
    base = torch.randn(90, 40)
    for a in (base.t(), base[::2, ::3], torch.randn(30, 80)[:, ::2]):
        assert not a.is_contiguous()
        pairs = aosae.gram_topk(a, 25, backend=backend)
        assert_matches_oracle(pairs, a, 25)
        assert_identical(pairs, aosae.gram_topk(a.contiguous(), 25, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(seed, backend):
    a = torch.relu(torch.randn(200, 300))
    first = aosae.gram_topk(a, 400, backend=backend)
    for _ in range(3):
        assert_identical(first, aosae.gram_topk(a, 400, backend=backend))


@pytest.mark.skipif(not HAVE_EXT, reason="aosae._C not built")
@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_cpu_threshold_hint_never_changes_the_result(seed, similarity):
    # a larger input than the other tests, so that several tiles and cut-backs happen
    a = torch.relu(torch.randn(64, 700))
    k = 2000
    exact = aosae.gram_topk(a, k, similarity=similarity, backend="cpu")
    assert_matches_oracle(exact, a, k, similarity == "cosine")
    kth = float(exact.values[-1].abs())
    for hint in (kth, 0.5 * kth, 2.0 * kth, 1e9, 1e-30):  # right, low, stale-high, absurd
        pairs = aosae.gram_topk(a, k, similarity=similarity, backend="cpu", threshold=torch.tensor(hint))
        assert_identical(pairs, exact)


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 12),
    n=st.integers(2, 30),
    data=st.data(),
)
def test_property_exact_on_integer_inputs(m, n, data):
    values = data.draw(st.lists(st.integers(-3, 3), min_size=m * n, max_size=m * n))
    a = torch.tensor(values, dtype=torch.float32).reshape(m, n)
    k = data.draw(st.integers(1, n * (n - 1) // 2))
    similarity = data.draw(st.sampled_from(SIMILARITIES))
    reference = aosae.gram_topk(a, k, similarity=similarity, backend="reference")
    assert_matches_oracle(reference, a, k, similarity == "cosine")
    if HAVE_EXT:
        fused = aosae.gram_topk(a, k, similarity=similarity, backend="cpu")
        assert_matches_oracle(fused, a, k, similarity == "cosine")
        if similarity == "dot":
            assert_identical(fused, reference)


# ---------------------------------------------------------------- gradients


def dense_penalty(a, rows, cols, cosine):
    """Σ|C_ij| over fixed pairs, through dense autograd: the gradient oracle."""
    x = a / a.norm(dim=0).clamp_min(1e-300) if cosine else a
    c = x.t() @ x
    valid = rows >= 0
    return c[rows[valid], cols[valid]].abs().sum()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_gradcheck(seed, backend, similarity):
    # fresh inputs, redrawn until the 7th and 8th scores are apart: finite differences
    # (eps 1e-6) must not flip the selection, whose gradient is discontinuous there
    while True:
        a = torch.randn(6, 9, dtype=torch.float64)
        scores = oracle_topk(a, 8, similarity == "cosine")[0]
        if scores[6][0] - scores[7][0] > 1e-3:
            break
    a.requires_grad_()

    def f(x):
        return aosae.gram_topk(x, 7, similarity=similarity, backend=backend).values

    assert torch.autograd.gradcheck(f, (a,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_matches_dense_autograd(seed, backend, similarity, dtype):
    a = torch.relu(torch.randn(40, 60, dtype=dtype)).requires_grad_()
    pairs = aosae.gram_topk(a, 30, similarity=similarity, backend=backend)  # the op alone: no loss scale
    (grad,) = torch.autograd.grad(pairs.values.abs().sum(), a)
    b = a.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(dense_penalty(b, pairs.rows, pairs.cols, similarity == "cosine"), b)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(grad.double(), want, atol=tol * float(want.abs().max()), rtol=tol)


@pytest.mark.skipif(not HAVE_EXT, reason="aosae._C not built")
def test_cpu_backend_with_many_tiles_and_grad(seed):
    # several tiles run on worker threads, whose grad mode is their own
    w = torch.randn(64, 600, requires_grad=True)
    f = torch.relu(torch.randn(256, 64) @ w)
    penalty, pairs = aosae.topk_ortho_loss(f, 500, backend="cpu")
    penalty.backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    assert_matches_oracle(pairs, f.detach(), 500)


def test_backward_ignores_empty_slots():
    a = torch.zeros(8, 6, dtype=torch.float64)
    a[:, 0] = 1.0
    a[:, 1] = 2.0  # one non-zero pair (0, 1); the other 4 slots are empty
    a.requires_grad_()
    pairs = aosae.gram_topk(a, 5)
    assert pairs.rows.tolist() == [0, -1, -1, -1, -1]
    (grad,) = torch.autograd.grad(pairs.values.sum(), a)
    want = torch.zeros_like(a)
    want[:, 0], want[:, 1] = 2.0, 1.0
    torch.testing.assert_close(grad, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_backward_low_precision_returns_input_dtype(seed, dtype):
    a = torch.relu(torch.randn(16, 20)).to(dtype).requires_grad_()
    penalty, _ = aosae.topk_ortho_loss(a, 10)
    penalty.backward()
    assert a.grad.dtype == dtype and torch.isfinite(a.grad.float()).all()


# ---------------------------------------------------------------- torch.library


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_opcheck(seed, backend, similarity):
    a = torch.randn(12, 10, requires_grad=True)
    torch.library.opcheck(torch.ops.aosae.gram_topk.default, (a, 9, similarity, backend, None))
    hint = torch.tensor(0.5)
    torch.library.opcheck(torch.ops.aosae.gram_topk.default, (a.detach(), 9, similarity, backend, hint))


def test_torch_compile_matches_eager(seed):
    loss = aosae.TopKOrthoLoss(k=20, warm_start=False)

    def step(x):
        return loss(torch.relu(x)) * 0.5

    x = torch.randn(32, 48, requires_grad=True)
    eager = step(x)
    (g_eager,) = torch.autograd.grad(eager, x)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    (g_comp,) = torch.autograd.grad(out, x)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(g_comp, g_eager)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "make,k,kwargs,error,match",
    [
        (lambda: torch.randn(10), 1, {}, ValueError, "2-D"),
        (lambda: torch.randn(2, 3, 4), 1, {}, ValueError, "2-D"),
        (lambda: torch.randn(5, 1), 1, {}, ValueError, "at least 2 columns"),
        (lambda: torch.randn(0, 4), 1, {}, ValueError, "at least one row"),
        (lambda: torch.randn(5, 4), 0, {}, ValueError, r"k must be in .* = \[1, 6\]"),
        (lambda: torch.randn(5, 4), 7, {}, ValueError, r"k must be in .* = \[1, 6\]"),
        (lambda: torch.randn(5, 4), 2.0, {}, TypeError, "k must be an int"),
        (lambda: torch.randint(0, 3, (5, 4)), 2, {}, TypeError, "floating"),
        (lambda: torch.randn(5, 4), 2, {"similarity": "pearson"}, ValueError, "similarity"),
        (lambda: torch.randn(5, 4), 2, {"backend": "cuda"}, ValueError, "unknown backend"),
        (lambda: torch.randn(5, 4).numpy(), 2, {}, TypeError, "torch.Tensor"),
        (lambda: torch.randn(5, 4).to_sparse(), 2, {}, TypeError, "dense"),
    ],
)
def test_bad_input(make, k, kwargs, error, match):
    with pytest.raises(error, match=match):
        aosae.gram_topk(make(), k, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_input(backend, bad):
    a = torch.randn(5, 4)
    a[2, 1] = bad
    with pytest.raises(ValueError, match="NaN/Inf"):
        aosae.gram_topk(a, 2, backend=backend)


def test_named_backend_on_unsupported_device():
    a = torch.randn(5, 4, device="meta")
    with pytest.raises(ValueError, match="cannot run here"):
        aosae.gram_topk(a, 2, backend="cpu")


def test_missing_extension_is_explained(monkeypatch):
    monkeypatch.setattr(_extension, "load", lambda: (None, "aosae._C is not built (test)"))
    with pytest.raises(ValueError, match=r"not built.*") as info:
        aosae.gram_topk(torch.randn(5, 4), 2, backend="cpu")
    assert "cannot run here" in str(info.value)
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation"):
        _extension.require()
    # auto falls back to a backend that works
    a = torch.randn(5, 4)
    assert_matches_oracle(aosae.gram_topk(a, 2), a, 2)


def test_env_override(monkeypatch):
    a = torch.randn(6, 5)
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert backends.resolve("auto", a) == "reference"
    monkeypatch.setenv(backends.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="unknown backend"):
        aosae.gram_topk(a, 2)


@pytest.mark.skipif(not os.environ.get("CI"), reason="outside CI an unbuilt extension only skips its tests")
def test_extension_is_built_in_ci():
    # in CI a missing aosae._C must fail, not turn every cpu-backend test into a skip
    assert HAVE_EXT, _extension.available()[1]


def test_auto_prefers_the_fused_cpu_kernel():
    if not HAVE_EXT:
        pytest.skip("aosae._C not built")
    assert backends.resolve("auto", torch.randn(64, 64)) == "cpu"


def test_k_for_fraction():
    assert aosae.k_for_fraction(8192, 0.005) == math.ceil(0.005 * 8192 * 8191 / 2)
    assert aosae.k_for_fraction(1000, 0.005) == 2498  # 2497.5 rounds up
    assert aosae.k_for_fraction(2, 0.005) == 1
    with pytest.raises(ValueError, match="fraction"):
        aosae.k_for_fraction(10, 0.0)
