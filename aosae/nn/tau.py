"""AdaptiveTau: the penalty weight τ that follows reconstruction quality,

    τ ← clip(τ · L_target / L_recon, τ_min, τ_max)

with L_target given, or calibrated as the mean reconstruction loss over the first steps;
and BudgetTau, the constrained alternative: τ steered so that the FVU meets a stated budget.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import torch


class AdaptiveTau:
    """The adaptive penalty weight τ ← clip(τ · L_target / L_recon, min, max).

    Calibration rule when `target` is None: τ stays at `init` for the first
    `calibration_steps` updates and L_target is set to the mean reconstruction loss
    over them (a run then asks "stay at least as good as early training"); after that
    the rule above applies every step. `target` is recorded in state_dict() so a
    resumed run continues with the same target.

    Args:
        init, min, max: τ₀ and its bounds (paper: 0.05 in [0.01, 0.2]).
        target: L_target; None means calibrate as described.
        calibration_steps: number of updates averaged when calibrating.
    """

    def __init__(
        self,
        init: float = 0.05,
        min: float = 0.01,  # noqa: A002 - the names of the paper
        max: float = 0.2,  # noqa: A002
        target: Optional[float] = None,
        calibration_steps: int = 100,
    ):
        if not (0 < min <= init <= max):
            raise ValueError(f"need 0 < min <= init <= max, got min={min}, init={init}, max={max}")
        if target is not None and not (math.isfinite(target) and target > 0):
            raise ValueError(f"target must be a positive finite loss or None, got {target}")
        if calibration_steps < 1:
            raise ValueError(f"calibration_steps must be >= 1, got {calibration_steps}")
        self.init, self.min, self.max = float(init), float(min), float(max)
        self.tau = float(init)
        self.target = None if target is None else float(target)
        self.calibration_steps = int(calibration_steps)
        self._calib_sum, self._calib_count = 0.0, 0

    @property
    def calibrated(self) -> bool:
        return self.target is not None

    def update(self, recon_loss: float | torch.Tensor) -> float:
        """Feed this step's reconstruction loss; returns τ for the next step."""
        recon = float(recon_loss)
        if not math.isfinite(recon):
            raise ValueError(f"AdaptiveTau.update got a non-finite reconstruction loss ({recon})")
        if self.target is None:
            self._calib_sum += recon
            self._calib_count += 1
            if self._calib_count >= self.calibration_steps:
                self.target = self._calib_sum / self._calib_count
            return self.tau
        ratio = self.target / recon if recon > 0 else math.inf
        self.tau = min(self.max, max(self.min, self.tau * ratio))
        return self.tau

    def state_dict(self) -> dict:
        return {
            "tau": self.tau,
            "target": self.target,
            "init": self.init,
            "min": self.min,
            "max": self.max,
            "calibration_steps": self.calibration_steps,
            "calib_sum": self._calib_sum,
            "calib_count": self._calib_count,
        }

    def load_state_dict(self, state: dict) -> None:
        self.tau, self.target = float(state["tau"]), state["target"]
        self.init, self.min, self.max = state["init"], state["min"], state["max"]
        self.calibration_steps = state["calibration_steps"]
        self._calib_sum, self._calib_count = state["calib_sum"], state["calib_count"]

    def __repr__(self) -> str:
        return f"AdaptiveTau(tau={self.tau:.4g}, target={self.target}, bounds=[{self.min}, {self.max}])"


TAU_RULES = ("paper", "budget")


class BudgetTau:
    """τ held to a reconstruction budget: the constrained (Lagrangian, GECO-style) form

        min  penalty   subject to   FVU ≤ budget

    whose Lagrangian  penalty + μ·(FVU − budget)  is, divided by μ, the training loss
    recon + τ·penalty with τ = 1/μ (up to the constant variance). μ follows the usual
    multiplicative dual ascent on a smoothed constraint, written for τ:

        FVU_ema ← (1 − s)·FVU_ema + s·recon/variance
        log τ   ← clip(log τ + clip(gain · log(budget / FVU_ema), ±max_step),  log min, log max)

    Reconstruction worse than budget lowers τ; better raises it; the fixed point is
    FVU_ema = budget. The error is a log ratio and each step is clipped, so that the early
    steps, when every FVU is far above any budget, cannot drive τ to its floor faster than
    it can climb back once the budget is met. τ settles wherever the budget binds (inside the bounds unless
    the budget is infeasible or slack for every τ in them). Unlike the paper's rule its
    target is a stated budget, not early training's reconstruction, so a run whose
    reconstruction keeps improving does not drive τ to its upper bound.

    Args:
        init, min, max: τ₀ and its bounds.
        budget: the FVU (1 − explained variance) allowed: a number, or one number per update
            (a schedule, e.g. 1.05 × a penalty-free run's smoothed FVU at the same step, see
            budget_from_run; the last entry holds after the schedule ends).
        variance: E‖x − E x‖² of the training activations (as scaled for training), so that
            recon / variance is the FVU of the batch.
        gain: step of log τ per unit of log(budget / FVU).
        max_step: largest change of log τ in one update.
        smoothing: EMA weight s of the newest batch.
        hold_steps: updates during which τ stays at init (the learning-rate warm-up:
            reconstruction is far from any budget then); the EMA still runs.
    """

    def __init__(
        self,
        init: float,
        min: float,  # noqa: A002 - the names of AdaptiveTau
        max: float,  # noqa: A002
        budget: float | Sequence[float],
        variance: float = 1.0,
        gain: float = 0.5,
        smoothing: float = 0.1,
        max_step: float = 0.05,
        hold_steps: int = 0,
    ):
        if not (0 < min <= init <= max):
            raise ValueError(f"need 0 < min <= init <= max, got min={min}, init={init}, max={max}")
        schedule = [float(budget)] if isinstance(budget, (int, float)) else [float(b) for b in budget]
        if not schedule or not all(math.isfinite(b) and b > 0 for b in schedule):
            raise ValueError(f"budget must be a positive finite FVU (e.g. 0.1) or a non-empty list of them, got {budget}")
        if not (math.isfinite(variance) and variance > 0):
            raise ValueError(f"variance must be positive and finite, got {variance}: the activations are constant")
        if not (math.isfinite(gain) and gain > 0):
            raise ValueError(f"gain must be positive, got {gain}")
        if not (math.isfinite(max_step) and max_step > 0):
            raise ValueError(f"max_step must be positive, got {max_step}")
        if not 0 < smoothing <= 1:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
        if hold_steps < 0:
            raise ValueError(f"hold_steps must be >= 0, got {hold_steps}")
        self.init, self.min, self.max = float(init), float(min), float(max)
        self.tau = float(init)
        self.schedule, self.variance = schedule, float(variance)
        self.gain, self.smoothing, self.hold_steps = float(gain), float(smoothing), int(hold_steps)
        self.max_step = float(max_step)
        self.fvu_ema: Optional[float] = None
        self.updates = 0

    @property
    def budget(self) -> float:
        """The FVU budget of the next update."""
        return self.schedule[min(self.updates, len(self.schedule) - 1)]

    @property
    def target(self) -> float:
        """The budget as a reconstruction loss (the unit of the trainer's `recon`)."""
        return self.budget * self.variance

    def update(self, recon_loss: float | torch.Tensor) -> float:
        """Feed this step's reconstruction loss (mean ‖x − x̂‖²); returns τ for the next step."""
        recon = float(recon_loss)
        if not math.isfinite(recon):
            raise ValueError(f"BudgetTau.update got a non-finite reconstruction loss ({recon})")
        fvu, budget = recon / self.variance, self.budget
        self.fvu_ema = fvu if self.fvu_ema is None else (1 - self.smoothing) * self.fvu_ema + self.smoothing * fvu
        self.updates += 1
        if self.updates <= self.hold_steps:
            return self.tau
        step = self.gain * math.log(budget / max(self.fvu_ema, 1e-30))
        step = min(self.max_step, max(-self.max_step, step))
        self.tau = min(self.max, max(self.min, self.tau * math.exp(step)))
        return self.tau

    def state_dict(self) -> dict:
        return {"rule": "budget", "tau": self.tau, "init": self.init, "min": self.min, "max": self.max,
                "schedule": self.schedule, "variance": self.variance, "gain": self.gain, "smoothing": self.smoothing,
                "max_step": self.max_step, "hold_steps": self.hold_steps, "fvu_ema": self.fvu_ema, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        if state.get("rule") != "budget":
            raise ValueError("this checkpoint's τ state is the paper rule's, not the budget rule's: "
                             "resume with the --tau-rule it was trained with")
        for name in ("tau", "init", "min", "max", "variance", "gain", "smoothing", "max_step"):
            setattr(self, name, float(state[name]))
        self.schedule = [float(b) for b in state["schedule"]]
        self.hold_steps, self.updates = int(state["hold_steps"]), int(state["updates"])
        self.fvu_ema = state["fvu_ema"]

    def __repr__(self) -> str:
        return f"BudgetTau(tau={self.tau:.4g}, budget FVU={self.budget:.4g}, bounds=[{self.min}, {self.max}])"


def budget_from_run(run_dir: str | Path, slack: float, variance: float, smoothing: float = 0.1) -> list[float]:
    """A per-step FVU budget from a reference run (typically penalty-free, same data and λ):
    (1 + slack) × its reconstruction loss, smoothed as BudgetTau smooths its own, divided
    by `variance` — "at every step, FVU at most slack above the reference run's".
    Reads the reference's metrics.jsonl (one JSON row per step with a `recon` field)."""
    from aosae.files import BadFile, read_jsonl

    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl: give --tau-budget-run the directory of a finished run")
    if not slack >= 0:
        raise ValueError(f"slack must be >= 0, got {slack}")
    fix = "give --tau-budget-run the directory of a finished run (one JSON row per step with its 'recon')"
    recons = []
    for number, row in enumerate(read_jsonl(path, fix), 1):
        recon = row.get("recon")
        if isinstance(recon, bool) or not isinstance(recon, (int, float)) or not math.isfinite(recon) or recon < 0:
            raise BadFile(path, f"row {number} has no finite 'recon' >= 0 (got {recon!r})", fix)
        recons.append(recon)
    if not recons:
        raise ValueError(f"{path} is empty: the reference run logged no step")
    out, ema = [], None
    for r in recons:
        ema = r if ema is None else (1 - smoothing) * ema + smoothing * r
        out.append((1 + slack) * ema / variance)
    return out
