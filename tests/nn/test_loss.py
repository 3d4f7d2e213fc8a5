"""TopKOrthoLoss, topk_ortho_loss and AdaptiveTau."""
from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch

import aosae
from oracle import oracle_topk


def test_penalty_is_sum_of_abs_over_oracle_topk_per_token(seed):
    """Default scale: Σ |C_ij| over the oracle's top-k pairs with C = fᵀf / B."""
    f = torch.relu(torch.randn(64, 120))
    loss = aosae.TopKOrthoLoss(fraction=0.005)
    k = aosae.k_for_fraction(120, 0.005)
    top, _ = oracle_topk(f, k)
    want = sum(score for score, *_ in top) / 64
    got = loss(f)
    assert got.dim() == 0 and got.dtype == torch.float32
    assert math.isclose(float(got), want, rel_tol=1e-5)
    assert loss.last_pairs.values.shape == (k,)
    assert math.isclose(float(loss.last_mean_abs), want / k, rel_tol=1e-5)


def test_batch_sum_scale_is_the_papers_literal_sum_and_per_token_is_batch_invariant(seed):
    f = torch.relu(torch.randn(50, 60))
    k = 12
    top, _ = oracle_topk(f, k)
    literal = sum(score for score, *_ in top)
    assert math.isclose(float(aosae.TopKOrthoLoss(k=k, scale="batch_sum")(f)), literal, rel_tol=1e-5)
    penalty, pairs = aosae.topk_ortho_loss(f, k, scale="batch_sum")
    assert math.isclose(float(penalty), literal, rel_tol=1e-5)
    # The same tokens repeated 4 times: per token nothing changes, the batch sum grows 4×.
    f4 = f.repeat(4, 1)
    per_token = aosae.TopKOrthoLoss(k=k)
    torch.testing.assert_close(per_token(f4), per_token(f), rtol=1e-5, atol=0)
    assert math.isclose(float(aosae.TopKOrthoLoss(k=k, scale="batch_sum")(f4)), 4 * literal, rel_tol=1e-5)


def test_cosine_scores_do_not_depend_on_the_scale(seed):
    f = torch.relu(torch.randn(40, 30))
    per_token = aosae.TopKOrthoLoss(k=6, similarity="cosine")
    batch_sum = aosae.TopKOrthoLoss(k=6, similarity="cosine", scale="batch_sum")
    torch.testing.assert_close(per_token(f), batch_sum(f), rtol=0, atol=0)
    assert float(per_token.last_pairs.values.abs().max()) <= 1.0 + 1e-6


def test_per_token_gradient_is_batch_sum_gradient_over_b(seed):
    f = torch.relu(torch.randn(32, 40)).requires_grad_(True)
    (g_tok,) = torch.autograd.grad(aosae.TopKOrthoLoss(k=8)(f), f)
    (g_sum,) = torch.autograd.grad(aosae.TopKOrthoLoss(k=8, scale="batch_sum")(f), f)
    torch.testing.assert_close(g_tok * 32, g_sum, rtol=1e-5, atol=1e-6)


def test_mean_reduction_and_explicit_k(seed):
    f = torch.zeros(16, 30)
    f[:, :4] = torch.rand(16, 4) + 0.1  # 6 non-zero pairs, k = 10: 4 empty slots
    top, _ = oracle_topk(f, 10)
    assert len(top) == 6
    mean = aosae.TopKOrthoLoss(k=10, reduction="mean", scale="batch_sum")(f)
    assert math.isclose(float(mean), sum(t[0] for t in top) / 6, rel_tol=1e-5)
    loss = aosae.TopKOrthoLoss(k=10, reduction="mean")
    assert math.isclose(float(loss(f)), sum(t[0] for t in top) / 6 / 16, rel_tol=1e-5)
    assert math.isclose(float(loss.last_mean_abs), float(loss(f)), rel_tol=1e-6)


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_gradient_reaches_the_encoder(seed, similarity):
    enc = torch.nn.Linear(8, 40)
    x = torch.randn(32, 8)
    penalty = aosae.TopKOrthoLoss(fraction=0.01, similarity=similarity)(torch.relu(enc(x)))
    penalty.backward()
    assert enc.weight.grad is not None and enc.weight.grad.abs().sum() > 0


def test_warm_start_gives_the_same_result_as_cold(seed):
    cold = aosae.TopKOrthoLoss(fraction=0.01, warm_start=False)
    warm = aosae.TopKOrthoLoss(fraction=0.01, warm_start=True)
    for step in range(4):
        f = torch.relu(torch.randn(48, 90) + 0.1 * step)  # drifting statistics
        torch.testing.assert_close(warm(f), cold(f), rtol=0, atol=0)
        for x, y in zip(warm.last_pairs, cold.last_pairs):
            assert torch.equal(x, y)


def test_loss_rejects_bad_settings():
    with pytest.raises(ValueError, match="fraction"):
        aosae.TopKOrthoLoss(fraction=1.5)
    with pytest.raises(ValueError, match="k must be a positive int"):
        aosae.TopKOrthoLoss(k=0)
    with pytest.raises(ValueError, match="reduction"):
        aosae.TopKOrthoLoss(reduction="max")
    with pytest.raises(ValueError, match="scale must be one of"):
        aosae.TopKOrthoLoss(scale="batch")
    with pytest.raises(ValueError, match="scale must be one of"):
        aosae.topk_ortho_loss(torch.rand(4, 6), 2, scale="sum")
    with pytest.raises(ValueError, match="similarity"):
        aosae.TopKOrthoLoss(similarity="l2")
    with pytest.raises(ValueError, match="2-D"):
        aosae.TopKOrthoLoss()(torch.randn(4, 5, 6))


def test_adaptive_tau_rule_and_bounds():
    tau = aosae.AdaptiveTau(init=0.05, min=0.01, max=0.2, target=1.0)
    assert tau.update(2.0) == pytest.approx(0.025)  # recon worse than target: τ shrinks
    assert tau.update(0.5) == pytest.approx(0.05)  # better: τ grows
    assert tau.update(0.01) == pytest.approx(0.2)  # clipped at max
    assert tau.update(1e6) == pytest.approx(0.01)  # clipped at min
    assert tau.update(0.0) == pytest.approx(0.2)  # perfect reconstruction: max


def test_adaptive_tau_calibrates_target_from_first_steps():
    tau = aosae.AdaptiveTau(calibration_steps=3)
    assert not tau.calibrated
    for recon in (3.0, 2.0, 1.0):
        assert tau.update(recon) == 0.05  # unchanged while calibrating
    assert tau.calibrated and tau.target == pytest.approx(2.0)
    assert tau.update(4.0) == pytest.approx(0.025)


def test_adaptive_tau_state_round_trip():
    tau = aosae.AdaptiveTau(calibration_steps=2)
    for recon in (1.0, 3.0, 1.5):
        tau.update(recon)
    copy = aosae.AdaptiveTau()
    copy.load_state_dict(tau.state_dict())
    assert copy.state_dict() == tau.state_dict()
    assert copy.update(0.7) == tau.update(0.7)


def test_adaptive_tau_errors():
    with pytest.raises(ValueError, match="min <= init <= max"):
        aosae.AdaptiveTau(init=0.5)
    with pytest.raises(ValueError, match="target"):
        aosae.AdaptiveTau(target=-1.0)
    with pytest.raises(ValueError, match="non-finite"):
        aosae.AdaptiveTau(target=1.0).update(float("nan"))


def _ragged(B, n, max_l0, pool=None):
    """CSR rows of 0..max_l0 distinct latents (BatchTopK-like), values > 0; and the dense f."""
    pool = pool or n
    lengths = torch.randint(0, max_l0 + 1, (B,))
    indices = torch.cat([torch.randperm(pool)[: int(length)] for length in lengths])
    values = torch.rand(indices.numel()) + 0.05
    offsets = torch.zeros(B + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    dense = torch.zeros(B, n)
    dense[torch.repeat_interleave(torch.arange(B), lengths), indices] = values
    return offsets, indices, values, dense


def _assert_from_sparse_equals_dense(loss, ref_loss, offsets, indices, values, dense):
    """loss.from_sparse on the rows and ref_loss on the dense f: the same penalty and gradient."""
    v = values.clone().requires_grad_()
    got = loss.from_sparse((offsets, indices, v), dense.shape[1])
    got.backward()
    f = dense.clone().requires_grad_()
    want = ref_loss(f)
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    rows = torch.repeat_interleave(torch.arange(dense.shape[0]), offsets[1:] - offsets[:-1])
    # float32: a cosine gradient entry that cancels to ~0 is left at rounding level of the largest
    scale = max(1.0, float(f.grad.abs().max())) * 5 if loss.similarity == "cosine" else 1.0
    torch.testing.assert_close(v.grad, f.grad[rows, indices], rtol=1e-4, atol=1e-6 * scale)


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_from_sparse_ragged_rows_equal_the_dense_penalty(seed, similarity, reduction):
    """BatchTopK rows (different lengths, some empty): value and gradient of the dense penalty,
    with a selection of min(k, P) pairs instead of k slots."""
    offsets, indices, values, dense = _ragged(48, 64, 9, pool=40)
    for k in (15, 2000):  # k below and above the co-active pairs (at most 780 among 40 latents)
        loss = aosae.TopKOrthoLoss(k=k, similarity=similarity, reduction=reduction)
        ref_loss = aosae.TopKOrthoLoss(k=k, similarity=similarity, reduction=reduction, backend="reference")
        _assert_from_sparse_equals_dense(loss, ref_loss, offsets, indices, values, dense)
        p = int((ref_loss.last_pairs.rows >= 0).sum())
        assert loss.last_pairs.values.numel() == min(k, p)
        assert loss.last_k == ref_loss.last_k == k
        assert loss.last_nonzero_share == pytest.approx(ref_loss.last_nonzero_share) == pytest.approx(min(k, p) / k)
        torch.testing.assert_close(loss.last_mean_abs, ref_loss.last_mean_abs, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(loss._kth, ref_loss._kth, rtol=1e-5, atol=1e-8)  # 0 when P < k


def test_from_sparse_sums_without_pairs_when_k_covers_them(seed, monkeypatch):
    """k above every co-active pair, positive latents, sum reduction: the penalty is Σ_{i<j} C_ij
    in one pass over the entries (aosae.ops.coactive_sum); the selection is made once, and only
    when last_pairs or what derives from it is read. A mean needs the pair count: it selects."""
    import aosae.nn.loss as loss_module

    calls = []
    select = loss_module.coactive_topk
    monkeypatch.setattr(loss_module, "coactive_topk", lambda *a, **kw: calls.append(1) or select(*a, **kw))
    offsets, indices, values, dense = _ragged(48, 64, 9, pool=40)  # at most 780 pairs among 40 latents
    loss = aosae.TopKOrthoLoss(k=2000)
    ref = aosae.TopKOrthoLoss(k=2000, backend="reference")  # (its dense path never calls coactive_topk)
    _assert_from_sparse_equals_dense(loss, ref, offsets, indices, values, dense)
    assert calls == []
    assert loss.last_nonzero_share == pytest.approx(ref.last_nonzero_share)
    torch.testing.assert_close(loss.last_mean_abs, ref.last_mean_abs, rtol=1e-5, atol=1e-8)
    assert float(loss._kth) == 0.0 and len(calls) == 1
    loss.from_sparse((offsets, indices, values), 64)
    loss.last_pairs = None  # set (a checkpoint, a reset): the pending rows are dropped
    assert loss.last_pairs is None and len(calls) == 1
    # the pairs are those of the call's values, even when the caller changes them in place afterwards
    snapshot = values.clone()
    loss.from_sparse((offsets, indices.int(), values), 64)
    values.mul_(2)
    torch.testing.assert_close(loss.last_pairs.values,
                               select(offsets, indices, snapshot, 64, 2000, ordered=False).values)
    mean = aosae.TopKOrthoLoss(k=2000, reduction="mean")
    mean.from_sparse((offsets, indices, values), 64)
    assert len(calls) == 3


@pytest.mark.parametrize("warm_start", [True, False])
def test_closed_form_is_skipped_after_a_batch_with_k_pairs_and_tried_again_after_fewer(seed, monkeypatch, warm_start):
    """The closed form needs at most k pairs: after a batch whose k-th score was > 0 (warm start)
    its bound is not computed; a batch with fewer pairs still gets every pair, records a k-th
    score of 0, and the call after it tries the closed form again. The penalty and its gradient
    are the reference's throughout."""
    import aosae.nn.loss as loss_module

    calls = []
    closed = loss_module.coactive_sum
    monkeypatch.setattr(loss_module, "coactive_sum", lambda *a, **kw: calls.append(1) or closed(*a, **kw))
    k = 150
    many = _ragged(40, 64, 12)  # hundreds of co-active pairs: more than k
    few = _ragged(48, 64, 9, pool=12)  # at most 66 pairs among 12 latents
    loss = aosae.TopKOrthoLoss(k=k, warm_start=warm_start)
    ref = aosae.TopKOrthoLoss(k=k, backend="reference")
    tried = []
    for batch in (many, many, few, few, many):
        _assert_from_sparse_equals_dense(loss, ref, *batch)
        tried.append(len(calls))
    if warm_start:
        assert tried == [1, 1, 1, 2, 3]  # skipped after a batch with k pairs, tried after one with fewer
    else:
        assert tried == [1, 2, 3, 4, 5]
    assert float(loss._kth) == pytest.approx(float(ref._kth), rel=1e-5)
    offsets, indices, values, _ = many
    loss.from_sparse((offsets, indices, values), 64)  # a k-th score > 0 recorded: the skip is armed
    with pytest.raises(TypeError):  # bad input still gets the op's own error
        loss.from_sparse((offsets, indices, values.tolist()), 64)


def test_from_sparse_reads_n_latents_from_the_carrier(seed):
    from typing import NamedTuple

    class Latents(NamedTuple):
        offsets: torch.Tensor
        indices: torch.Tensor
        values: torch.Tensor
        n_latents: int

    offsets, indices, values, dense = _ragged(20, 30, 6)
    loss = aosae.TopKOrthoLoss(k=10)
    torch.testing.assert_close(loss.from_sparse(Latents(offsets, indices, values, 30)), loss.from_sparse(
        (offsets, indices, values), 30))
    with pytest.raises(TypeError, match="n_latents"):
        loss.from_sparse((offsets, indices, values))
    with pytest.raises(TypeError, match="offsets, indices, values"):
        loss.from_sparse(values, 30)


def test_from_topk_at_two_to_the_twenty_never_pads(seed):
    """The paper's k at n = 2²⁰ is 2.7·10⁹ slots; the selection holds the co-active pairs only."""
    n, B, L = 2**20, 16, 8
    indices = torch.randint(0, n // L, (B, L)) + torch.arange(L) * (n // L)
    values = (torch.rand(B, L) + 0.1).requires_grad_()
    loss = aosae.TopKOrthoLoss()
    penalty = loss.from_topk(indices, values, n)
    penalty.backward()
    assert loss.last_k == aosae.k_for_fraction(n, 0.005)
    assert 0 < loss.last_pairs.values.numel() <= B * L * (L - 1) // 2
    assert float(loss._kth) == 0.0 and loss.last_nonzero_share < 1e-6
    assert values.grad is not None and bool(torch.isfinite(values.grad).all())


@pytest.mark.parametrize("k", [None, 5000])
def test_the_loss_at_two_to_the_twenty_four_runs_in_small_memory(k):
    """n = 2²⁴ through the loss's training entries, from_topk (TopK rows) and from_sparse (rows of
    different lengths, as BatchTopK's): with the paper's k (≈ 7·10¹¹, above every co-active pair:
    the closed form) and with k = 5000 (below them: the k-best sum), forward, backward and the
    selection read back for logging. In a subprocess, peak RSS grows by less than 64 MiB, one
    n-sized float32 array: nothing is sized by n, n² or k."""
    script = textwrap.dedent(f"""
        import resource, torch, aosae
        torch.set_num_threads(2)
        n, B, L = 2 ** 24, 64, 32
        loss = aosae.TopKOrthoLoss(k={k})
        # a tiny call first: the custom ops' machinery imports torch._dynamo on its first call
        loss.from_topk(torch.tensor([[1, 5]]), torch.ones(1, 2), n)
        loss.last_pairs
        torch.manual_seed(0)
        idx = torch.randint(0, n // L, (B, L)) + torch.arange(L) * (n // L)  # distinct within a row
        values = (torch.rand(B, L) + 0.1).requires_grad_()
        lengths = torch.randint(L // 2, L + 1, (B,))  # ragged rows: the first lengths[t] of each row
        keep = torch.arange(L) < lengths[:, None]
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        calls = ((lambda: loss.from_topk(idx, values, n), B * L * (L - 1) // 2),
                 (lambda: loss.from_sparse((offsets, idx[keep], values[keep]), n),
                  int((lengths * (lengths - 1) // 2).sum())))
        for call, row_pairs in calls:
            penalty = call()
            penalty.backward()
            assert torch.isfinite(penalty) and float(penalty.detach()) > 0
            # (these rows share no pair of latents: every row pair is a co-active pair)
            assert loss.last_pairs.values.numel() == min(loss.last_k, row_pairs)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert bool(torch.isfinite(values.grad).all()) and float(values.grad.abs().sum()) > 0
        print((peak - base) / 1024)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    extra_mib = float(out.stdout.split()[-1])
    assert extra_mib < 64, f"peak RSS grew by {extra_mib} MiB at n = 2^24"


@pytest.mark.parametrize("method", ["forward", "on_support"])
def test_dense_entries_on_the_sparse_path_never_pad(seed, method):
    """forward (backend sparse) and on_support select through coactive_topk: min(k, P) pairs,
    the same penalty and gradient as the reference backend's padded selection."""
    f = torch.relu(torch.randn(32, 80) - 1.8)  # a ReLU SAE after its dense phase: few co-active pairs
    k = aosae.k_for_fraction(80, 0.2)
    loss = aosae.TopKOrthoLoss(k=k, backend="sparse")
    x = f.clone().requires_grad_()
    got = getattr(loss, method)(x)
    (got * 3).backward()
    ref = aosae.TopKOrthoLoss(k=k, backend="reference")
    y = f.clone().requires_grad_()
    want = ref(y)
    (want * 3).backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    grad = x.grad.to_dense() if x.grad.is_sparse else x.grad
    mask = f != 0 if method == "on_support" else torch.ones_like(f, dtype=torch.bool)
    torch.testing.assert_close(grad[mask], y.grad[mask], rtol=1e-4, atol=1e-6)
    p = int((ref.last_pairs.rows >= 0).sum())
    assert p < k and loss.last_pairs.values.numel() == p
    assert loss.last_nonzero_share == pytest.approx(p / k)
