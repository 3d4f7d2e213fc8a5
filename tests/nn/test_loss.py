"""TopKOrthoLoss, topk_ortho_loss and AdaptiveTau."""
from __future__ import annotations

import math

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
