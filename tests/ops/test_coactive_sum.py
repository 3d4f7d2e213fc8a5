"""coactive_sum, the penalty's sum without its pairs: equal to the sum over coactive_topk's
selection (value and gradient, float64 and float32, dot and cosine) whenever it answers, None
whenever the rows do not prove that the selection keeps every pair, and pairs_bound never below
the true count of co-active pairs."""
from __future__ import annotations

import pytest
import torch

from aosae.nn.loss import TopKOrthoLoss
from aosae.ops import coactive_sum as coactive_sum_module
from aosae.ops.coactive_sum import coactive_sum, pairs_bound
from aosae.ops.coactive_topk import coactive_topk
from test_coactive_topk import outlier_rows, ragged_rows

BIG_K = 10**12


@pytest.fixture(autouse=True, params=["host", "one_sync"])
def _fresh_inputs(seed, request, monkeypatch):
    """Every test draws fresh random inputs (conftest's `seed` reseeds torch and prints it), and runs
    both ways: the CPU's (C++ canonical checks) and the one-host-sync path CUDA takes."""
    if request.param == "one_sync":
        monkeypatch.setattr(coactive_sum_module, "_on_host", lambda values: False)


def selection_sum(offsets, indices, values, n, k, similarity):
    """Σ |C_ij| over the op's selection and its gradient w.r.t. values."""
    v = values.detach().clone().requires_grad_()
    total = coactive_topk(offsets, indices, v, n, k, similarity=similarity, ordered=False).values.abs().sum()
    total.backward()
    return total.detach(), v.grad


def shortcut_sum(offsets, indices, values, n, k, similarity):
    v = values.detach().clone().requires_grad_()
    total = coactive_sum(offsets, indices, v, n, k, similarity=similarity)
    assert total is not None, "the rows prove k >= P: coactive_sum should answer"
    total.backward()
    return total.detach(), v.grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("similarity", ["dot", "cosine"])
@pytest.mark.parametrize("rows", ["ragged", "outliers", "topk"])
def test_equals_the_selections_sum_and_gradient(dtype, similarity, rows):
    if rows == "ragged":
        offsets, indices, values, _ = ragged_rows(int(torch.randint(20, 60, ())), 97, 11, dtype=dtype)
        n = 97
    elif rows == "outliers":  # a few long rows: the bound needs its dense-row term
        offsets, indices, values, _, n = outlier_rows(dtype, signed=False)
    else:
        B, L, n = int(torch.randint(5, 40, ())), 7, 301
        indices = torch.stack([torch.randperm(n)[:L] for _ in range(B)]).flatten()
        offsets = torch.arange(B + 1) * L
        values = (torch.rand(B * L, dtype=torch.float64) + 0.05).to(dtype)
    k = pairs_bound(offsets, indices) + int(torch.randint(0, 3, ()))
    got, got_grad = shortcut_sum(offsets, indices, values, n, k, similarity)
    want, want_grad = selection_sum(offsets, indices, values, n, k, similarity)
    assert got.dtype == want.dtype
    # float32: the op sums in float32 (this in float64); a latent seen in one row only has a cosine
    # gradient that cancels to ~0, which float32 leaves at rounding level of the largest entries
    eps = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got, want, rtol=eps, atol=eps)
    torch.testing.assert_close(got_grad, want_grad, rtol=eps, atol=eps * max(1.0, float(want_grad.abs().max())))


def test_int32_rows_and_long_rows_past_every_threshold():
    """int32 offsets and indices; rows of 1200 and 300 latents (the bound's 1024 and 256 tiers)."""
    lengths = [1200, 300, 300, 5, 0, 7]
    big = torch.randperm(1500)[:1200]  # the 300-rows share its latents: only the 256 tier sees that
    indices = torch.cat([big] + [big[torch.randperm(1200)[:n]] for n in lengths[1:3]]
                        + [torch.randperm(1500)[:n] for n in lengths[3:]])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.tensor(lengths).cumsum(0)])
    values = torch.rand(indices.numel(), dtype=torch.float64) + 0.05
    k = pairs_bound(offsets, indices)
    assert k < sum(n * (n - 1) // 2 for n in lengths)  # the dense rows tightened it
    for similarity in ("dot", "cosine"):
        got, got_grad = shortcut_sum(offsets.int(), indices.int(), values, 1500, k, similarity)
        want, want_grad = selection_sum(offsets, indices, values, 1500, k, similarity)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        # a latent of one row only: its cosine gradient cancels to ~0, left at the rounding of 1200 terms
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-12 * max(1.0, float(want_grad.abs().max())) * 1e3)


def test_half_precision_values_sum_in_float32():
    offsets, indices, values, _ = ragged_rows(30, 50, 6)
    for dtype in (torch.float16, torch.bfloat16):
        v = values.to(dtype)
        got = coactive_sum(offsets, indices, v, 50, BIG_K)
        want = coactive_topk(offsets, indices, v, 50, BIG_K).values.abs().sum()
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bound_is_never_below_the_pairs_and_is_exact_for_disjoint_rows():
    for _ in range(5):
        offsets, indices, values, _ = ragged_rows(int(torch.randint(1, 50, ())), 60, 12, pool=int(torch.randint(12, 60, ())))
        pairs = coactive_topk(offsets, indices, values, 60, BIG_K).values.numel()
        assert pairs_bound(offsets, indices) >= pairs
        offsets, indices, values, _, n = outlier_rows(torch.float64, signed=False)
        assert pairs_bound(offsets, indices) >= coactive_topk(offsets, indices, values, n, BIG_K).values.numel()
    # rows on disjoint latents: every row pair is a distinct co-active pair
    lengths = torch.randint(0, 9, (20,))
    indices = torch.randperm(int(lengths.sum()) + 5)[: int(lengths.sum())]
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    assert pairs_bound(offsets, indices) == int((lengths * (lengths - 1) // 2).sum())


def test_dense_rows_tighten_the_bound():
    """Three rows on the same 100 latents: 3 · 4950 row pairs, 4950 co-active pairs."""
    indices = torch.cat([torch.randperm(100) for _ in range(3)])
    offsets = torch.tensor([0, 100, 200, 300])
    values = torch.rand(300, dtype=torch.float64) + 0.1
    assert pairs_bound(offsets, indices) == 4950
    assert coactive_sum(offsets, indices, values, 100, 4950) is not None
    assert coactive_sum(offsets, indices, values, 100, 4949) is None
    # a row of one entry has no pair and does not loosen the dense rows' bound (its latent is not theirs)
    offsets, indices = torch.tensor([0, 100, 200, 300, 301]), torch.cat([indices, torch.tensor([150])])
    assert pairs_bound(offsets, indices) == 4950
    assert coactive_sum(offsets, indices, torch.cat([values, torch.ones(1, dtype=torch.float64)]), 151, 4950) is not None


@pytest.mark.parametrize("case", ["zero", "negative", "k_below_the_bound"])
def test_declines_when_the_rows_do_not_prove_it(case):
    offsets, indices, values, _ = ragged_rows(30, 40, 8)
    k = BIG_K
    if case == "zero":  # a zero entry scores nothing: the selection may leave its pairs out
        values[int(torch.randint(0, values.numel(), ()))] = 0
    elif case == "negative":  # |C_ij| is not C_ij
        values[int(torch.randint(0, values.numel(), ()))] *= -1
    else:
        k = max(1, coactive_topk(offsets, indices, values, 40, BIG_K).values.numel() - 1)
    assert coactive_sum(offsets, indices, values, 40, k) is None


def test_bad_input_is_named_as_the_op_names_it():
    """Bad rows raise the op's own messages (or decline, and the op then raises)."""
    offsets, values = torch.tensor([0, 2, 3]), torch.ones(3)
    with pytest.raises(ValueError, match="repeats a latent"):
        coactive_sum(offsets, torch.tensor([1, 1, 2]), values, 4, BIG_K)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        coactive_sum(offsets, torch.tensor([0, 1, 2]), values, 2, BIG_K)
    # a NaN is not > 0: declined, and the selection the caller then makes names it
    nan = torch.tensor([1.0, float("nan"), 1.0])
    assert coactive_sum(offsets, torch.tensor([0, 1, 2]), nan, 4, BIG_K) is None
    with pytest.raises(ValueError, match="NaN"):
        TopKOrthoLoss(k=BIG_K).from_sparse((offsets, torch.tensor([0, 1, 2]), nan), 4)
    with pytest.raises(ValueError, match="k must"):
        coactive_sum(offsets, torch.tensor([0, 1, 2]), values, 4, 0)


def test_empty_rows_decline():
    assert coactive_sum(torch.zeros(4, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), torch.zeros(0), 8,
                        BIG_K) is None
