"""The ablation's arms and datasets: each arm is a TrainConfig difference, nothing else.

Every arm trains through aosae.training.trainer.Trainer (the recipe of `aosae train`:
activations scaled to E‖x‖ = 1, the SAE's init, AdamW with warm-up, decoder-row projection
and renormalisation); an arm only changes the penalty and the τ rule. Budgeted arms hold
the training FVU to (1 + slack) × the FVU of the penalty-free arm trained with the same λ
(or k) and seed, with τ from BudgetTau in wide bounds, so that τ settles where the budget
binds instead of at a bound the penalty's scale happens to hit.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# τ range of the budgeted arms: wide, so that the budget and not a bound decides τ
BUDGET_TAU = {"tau_init": 1e-2, "tau_min": 1e-4, "tau_max": 1e2}


@dataclass(frozen=True)
class Arm:
    name: str
    description: str
    overrides: dict = field(default_factory=dict)
    budgeted: bool = False


ARMS = {a.name: a for a in (
    Arm("none", "recon + λ·L1, no penalty", {"ortho": False}),
    Arm("paper", "the paper, literally: Σ top-0.5% |C_ij| (dot), τ by the paper's rule in [0.01, 0.2]"),
    Arm("paper_sum", "the paper's literal scale C = fᵀf (B× the per-token C), τ by the paper's rule",
        {"ortho_scale": "batch_sum"}),
    Arm("paper_budget", "the paper's penalty, τ by the FVU budget", {}, True),
    Arm("coact_cosine", "Σ top-0.5% |cos(f_i, f_j)| (co-activation cosine)", {"similarity": "cosine"}, True),
    Arm("coact_x_decoder", "Σ top-0.5% |C_ij|·|cos(d_i, d_j)| (co-active and aligned)", {"penalty": "coact_x_decoder"}, True),
    Arm("decoder_on_coactive", "Σ |cos(d_i, d_j)| over the top-0.5% co-active pairs", {"penalty": "decoder_on_coactive"}, True),
    Arm("decoder", "Σ top-0.5% |cos(d_i, d_j)| of the decoder Gram (OrtSAE-style)", {"penalty": "decoder"}, True),
    Arm("coactive_rule", "the paper's penalty on 10% of the co-active pairs", {"pair_rule": "coactive", "fraction": 0.1}, True),
)}


def arm_overrides(arm: Arm, reference_run: str | None, slack: float) -> dict:
    """TrainConfig fields of one arm; budgeted arms need the penalty-free arm's run directory:
    their budget at step t is (1 + slack) × its smoothed training FVU at step t."""
    out = dict(arm.overrides)
    if arm.budgeted:
        if reference_run is None:
            raise ValueError(f"arm {arm.name!r} is budgeted: train the 'none' arm first (its FVU sets the budget)")
        out.update(BUDGET_TAU, tau_rule="budget", tau_budget_run=str(reference_run), tau_slack=float(slack))
    return out


def parse_arms(text: str) -> tuple[str, ...]:
    names = tuple(a.strip() for a in text.split(",") if a.strip())
    bad = [a for a in names if a not in ARMS]
    if bad or not names:
        raise ValueError(f"unknown or no arm(s) {bad}; choose from {', '.join(ARMS)}")
    if "none" not in names:  # always: the budgets and every comparison of the report are against it
        names = ("none",) + names
    return tuple(sorted(names, key=lambda a: a != "none"))
