"""BudgetTau (the constrained τ rule) against a simple simulated plant and hand-computed steps."""
from __future__ import annotations

import json
import math

import pytest

from aosae.nn.tau import AdaptiveTau, BudgetTau, budget_from_run


def test_one_step_by_hand():
    t = BudgetTau(0.1, 1e-3, 10.0, budget=0.2, variance=2.0, gain=0.5, smoothing=1.0, max_step=1.0)
    t.update(0.2 * 2.0 * math.e ** -0.1)  # FVU = budget · e^-0.1: log(budget / FVU) = 0.1
    assert t.tau == pytest.approx(0.1 * math.exp(0.05))
    assert t.target == pytest.approx(0.4)
    t.update(100.0)  # far over budget: the step is clipped to −max_step
    assert t.tau == pytest.approx(0.1 * math.exp(0.05) * math.exp(-1.0))


def test_settles_inside_bounds_where_the_paper_rule_pins():
    """Plant: FVU = base(t) + c·τ, base falling over training (as a real run's recon). The budget rule
    settles at the τ that meets the budget; the paper's rule, calibrated early, runs to τ_max."""
    c, budget = 0.05, 0.12
    base = lambda s: 0.1 + 0.5 * math.exp(-s / 50)  # noqa: E731
    ours = BudgetTau(0.05, 0.01, 0.5, budget=budget, hold_steps=20)
    paper = AdaptiveTau(0.05, 0.01, 0.2, calibration_steps=20)
    for s in range(2000):
        ours.update(base(s) + c * ours.tau)
        paper.update(base(s) + c * paper.tau)
    want = (budget - 0.1) / c  # 0.4
    assert ours.min < ours.tau < ours.max
    assert ours.tau == pytest.approx(want, rel=0.02)
    assert paper.tau == paper.max


def test_hold_schedule_and_state_roundtrip():
    t = BudgetTau(0.05, 0.01, 1.0, budget=[0.5, 0.4, 0.3], hold_steps=2)
    assert t.budget == 0.5
    t.update(0.1), t.update(0.1)
    assert t.tau == 0.05 and t.budget == 0.3  # held, then the schedule's last entry holds
    t.update(0.1)
    assert t.tau > 0.05
    clone = BudgetTau(0.05, 0.01, 1.0, budget=1.0)
    clone.load_state_dict(json.loads(json.dumps(t.state_dict())))
    assert clone.state_dict() == t.state_dict()
    with pytest.raises(ValueError, match="paper rule"):
        clone.load_state_dict(AdaptiveTau().state_dict())


def test_budget_from_run(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "recon": r}) + "\n"
                                                    for i, r in enumerate([2.0, 1.0, 1.0])))
    got = budget_from_run(tmp_path, slack=0.1, variance=2.0, smoothing=0.5)
    assert got == pytest.approx([1.1 * 2.0 / 2, 1.1 * 1.5 / 2, 1.1 * 1.25 / 2])
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        budget_from_run(tmp_path / "missing", 0.1, 1.0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(budget=0.0), "budget"), (dict(budget=[]), "budget"), (dict(budget=0.1, variance=0.0), "variance"),
    (dict(budget=0.1, gain=-1.0), "gain"), (dict(budget=0.1, smoothing=0.0), "smoothing"),
])
def test_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BudgetTau(0.05, 0.01, 0.2, **kwargs)
    with pytest.raises(ValueError, match="non-finite"):
        BudgetTau(0.05, 0.01, 0.2, budget=0.1).update(float("nan"))
