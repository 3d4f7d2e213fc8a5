"""AdaptiveTau: the penalty weight τ that follows reconstruction quality,

    τ ← clip(τ · L_target / L_recon, τ_min, τ_max)

with L_target given, or calibrated as the mean reconstruction loss over the first steps.
"""
from __future__ import annotations

import math
from typing import Optional

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
