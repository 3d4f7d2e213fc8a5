"""dictionary_learning integration: trainers that add the selective orthogonality penalty.

    AosaeStandardTrainer  dictionary_learning's StandardTrainer (ReLU + L1, unit-norm decoder
                          columns via ConstrainedAdam) + c·τ·Σ_{top-k pairs}|C_ij|
    AosaeTopKTrainer      dictionary_learning's TopKTrainer (AuxK, unit-norm decoder) + the same

Use them wherever trainSAE takes a trainer class:

    from aosae.integrations.dictionary_learning import AosaeStandardTrainer
    trainSAE(data=activation_buffer, steps=..., trainer_configs=[dict(
        trainer=AosaeStandardTrainer, activation_dim=d, dict_size=n, layer=L, lm_name=name,
        lr=1e-3, l1_penalty=0.04, ortho_fraction=0.005, tau_init=0.05)], device="cpu")

Penalty settings (extra keyword arguments of both trainers; defaults are the paper's):
    orthogonality_coefficient=1.0  fixed factor c in front of τ
    ortho_fraction=0.005, ortho_k=None, ortho_similarity="dot", ortho_reduction="sum",
    ortho_backend="auto"           as in aosae.TopKOrthoLoss
    adaptive_tau=True              τ ← clip(τ·L_target/L_mse, tau_min, tau_max) every step
    tau_init=0.05, tau_min=0.01, tau_max=0.2, tau_target=None, tau_calibration_steps=100
                                   as in aosae.AdaptiveTau (None: L_target = mean MSE of the
                                   first tau_calibration_steps steps)

How it hooks in: the trainer's own `loss` runs unchanged while the dictionary's `decode`
is observed for the duration of the call; its input is the latents f [batch, dict_size]
(the first decode of the call: the reconstruction, not AuxK's) and its output x̂, which
gives the step's MSE for τ. Logging calls (`loss(..., logging=True)`) report
"orthogonality_loss", "orthogonality_penalty" and "tau" and leave τ alone.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from aosae.integrations import missing_dependency_message

_missing = missing_dependency_message("dictionary_learning")
if _missing is not None:
    raise ImportError(_missing)

from dictionary_learning.trainers.standard import StandardTrainer  # noqa: E402
from dictionary_learning.trainers.top_k import TopKTrainer  # noqa: E402

from aosae.nn.loss import TopKOrthoLoss  # noqa: E402
from aosae.nn.tau import AdaptiveTau  # noqa: E402

__all__ = ["ORTHO_DEFAULTS", "AosaeStandardTrainer", "AosaeTopKTrainer"]

ORTHO_DEFAULTS: dict[str, Any] = {
    "orthogonality_coefficient": 1.0,
    "ortho_fraction": 0.005,
    "ortho_k": None,
    "ortho_similarity": "dot",
    "ortho_reduction": "sum",
    "ortho_backend": "auto",
    "adaptive_tau": True,
    "tau_init": 0.05,
    "tau_min": 0.01,
    "tau_max": 0.2,
    "tau_target": None,
    "tau_calibration_steps": 100,
}


@contextlib.contextmanager
def _observe_decode(ae: torch.nn.Module) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Record (f, x̂) of every `ae.decode(f)` call inside the block; the class method is restored after."""
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = ae.decode
    shadowed = "decode" in vars(ae)

    def decode(f: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        x_hat = original(f, *args, **kwargs)
        calls.append((f, x_hat))
        return x_hat

    ae.decode = decode  # an instance attribute shadows the method, for this call only
    try:
        yield calls
    finally:
        if shadowed:
            ae.decode = original
        else:
            del ae.decode


class _OrthogonalityPenalty:
    """Mixin for a dictionary_learning SAETrainer: adds c·τ·penalty to its `loss`."""

    ae: torch.nn.Module

    @staticmethod
    def _pop_settings(kwargs: dict[str, Any]) -> dict[str, Any]:
        settings = {name: kwargs.pop(name, default) for name, default in ORTHO_DEFAULTS.items()}
        coefficient = settings["orthogonality_coefficient"]
        if not (isinstance(coefficient, (int, float)) and coefficient >= 0):
            raise ValueError(f"orthogonality_coefficient must be a number >= 0, got {coefficient!r}")
        return settings

    def _init_orthogonality(self, settings: dict[str, Any]) -> None:
        self.ortho_settings = settings
        self.orthogonality_coefficient = float(settings["orthogonality_coefficient"])
        self.orthogonality_loss = TopKOrthoLoss(
            settings["ortho_fraction"],
            k=settings["ortho_k"],
            similarity=settings["ortho_similarity"],
            reduction=settings["ortho_reduction"],
            backend=settings["ortho_backend"],
        )
        self.adaptive_tau = AdaptiveTau(
            init=settings["tau_init"],
            min=settings["tau_min"],
            max=settings["tau_max"],
            target=settings["tau_target"],
            calibration_steps=settings["tau_calibration_steps"],
        )
        self.last_orthogonality_penalty: torch.Tensor | None = None

    def loss(self, x: torch.Tensor, step: int | None = None, logging: bool = False, **kwargs: Any) -> Any:
        with _observe_decode(self.ae) as calls:
            base = super().loss(x, step=step, logging=logging, **kwargs)  # type: ignore[misc]
        if not calls:
            raise RuntimeError(
                f"{type(self.ae).__name__} never called decode() inside {type(self).__name__}.loss, so the "
                "latents are unknown: use a dictionary whose forward/encode path decodes with ae.decode(f)"
            )
        f, x_hat = calls[0]
        penalty = self.orthogonality_loss(f.reshape(-1, f.shape[-1]))
        tau = self.adaptive_tau.tau
        ortho_loss = (self.orthogonality_coefficient * tau) * penalty
        self.last_orthogonality_penalty = penalty.detach()
        if not logging:
            if self.ortho_settings["adaptive_tau"] and torch.is_grad_enabled():
                recon = (x - x_hat).detach().pow(2).sum(dim=-1).mean()
                self.adaptive_tau.update(recon)
            return base + ortho_loss.to(base.dtype)
        losses = dict(base.losses)
        losses["orthogonality_penalty"] = penalty.item()
        losses["orthogonality_loss"] = ortho_loss.item()
        losses["tau"] = tau
        if "loss" in losses:
            losses["loss"] = losses["loss"] + ortho_loss.item()
        return base._replace(losses=losses)

    @property
    def config(self) -> dict[str, Any]:
        config = dict(super().config)  # type: ignore[misc]
        config["trainer_class"] = type(self).__name__
        config.update(self.ortho_settings)
        config["tau_final"] = self.adaptive_tau.tau
        config["tau_target_used"] = self.adaptive_tau.target
        return config


class AosaeStandardTrainer(_OrthogonalityPenalty, StandardTrainer):
    """StandardTrainer + selective orthogonality penalty (keyword arguments: see module docstring).

    All StandardTrainer arguments (steps, activation_dim, dict_size, layer, lm_name, lr,
    l1_penalty, warmup_steps, ...) work unchanged.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        settings = self._pop_settings(kwargs)
        super().__init__(*args, **kwargs)
        self._init_orthogonality(settings)


class AosaeTopKTrainer(_OrthogonalityPenalty, TopKTrainer):
    """TopKTrainer + selective orthogonality penalty (keyword arguments: see module docstring).

    All TopKTrainer arguments (steps, activation_dim, dict_size, k, layer, lm_name, lr,
    auxk_alpha, ...) work unchanged.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        settings = self._pop_settings(kwargs)
        super().__init__(*args, **kwargs)
        self._init_orthogonality(settings)
