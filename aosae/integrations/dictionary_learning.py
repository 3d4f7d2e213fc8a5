"""dictionary_learning integration: trainers that add the selective orthogonality penalty.

    AosaeStandardTrainer  dictionary_learning's StandardTrainer (ReLU + L1, unit-norm decoder
                          columns via ConstrainedAdam) + c·τ·Σ_{top-k pairs}|C_ij|
    AosaeTopKTrainer      dictionary_learning's TopKTrainer (AuxK, unit-norm decoder) + the same

Use them wherever trainSAE takes a trainer class:

    from aosae.integrations.dictionary_learning import AosaeStandardTrainer
    trainSAE(data=activation_buffer, steps=..., trainer_configs=[dict(
        trainer=AosaeStandardTrainer, activation_dim=d, dict_size=n, layer=L, lm_name=name,
        lr=1e-3, l1_penalty=0.04, ortho_fraction=0.005, tau_init=0.05)], device="cpu")

Penalty settings (extra keyword arguments of both trainers):
    orthogonality_coefficient=1.0  fixed factor c in front of τ
    ortho_scale="per_token"        C = fᵀf / B, the scale of the trainers' per-token MSE;
                                   "batch_sum" is the paper's literal C = fᵀf (B× larger)
    ortho_fraction=0.005, ortho_k=None, ortho_similarity="dot", ortho_reduction="sum",
    ortho_backend="auto"           as in aosae.TopKOrthoLoss
    adaptive_tau=True              τ ← clip(τ·L_target/L_mse, tau_min, tau_max) every step
    tau_init=0.05, tau_min=0.01, tau_max=0.1, tau_target=None, tau_calibration_steps=100
                                   as in aosae.AdaptiveTau (None: L_target = mean MSE of the
                                   first tau_calibration_steps steps); τ_max is half the paper's
                                   0.2, as in the SAELens adapter (τ sits at τ_max once
                                   reconstruction beats the early target)

How it hooks in: the trainer's own `loss` runs unchanged while the dictionary's `decode`
is observed for the duration of the call; its input is the latents f [batch, dict_size]
(the first decode of the call: the reconstruction, not AuxK's) and its output x̂, which
gives the step's MSE for τ. For TopK dictionaries, `encode(..., return_topk=True)` is
observed too and the penalty reads its (indices, values) through aosae.gram_topk_sparse:
never the dense f. Logging calls (`loss(..., logging=True)`) add "orthogonality_loss",
"orthogonality_penalty" and "tau" to the loss log and leave τ alone; trainSAE's logger also
reads the trainer attributes "tau", "orthogonality_penalty" and "orthogonality_mean_abs_c"
(the selected pairs' mean |C_ij|) through `logging_parameters`.

τ is trainer state: trainSAE saves only `ae.state_dict()` and has no resume, so keep
`trainer.adaptive_tau.state_dict()` yourself if you resume by hand (`load_state_dict` restores it).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

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
    "ortho_scale": "per_token",
    "ortho_backend": "auto",
    "adaptive_tau": True,
    "tau_init": 0.05,
    "tau_min": 0.01,
    "tau_max": 0.1,
    "tau_target": None,
    "tau_calibration_steps": 100,
}


@contextlib.contextmanager
def _observe(ae: torch.nn.Module, name: str) -> Iterator[list[tuple[tuple, dict, Any]]]:
    """Record (args, kwargs, result) of every `ae.<name>(...)` call inside the block; restored after."""
    calls: list[tuple[tuple, dict, Any]] = []
    original = getattr(ae, name)
    shadowed = name in vars(ae)

    def observed(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        calls.append((args, kwargs, result))
        return result

    setattr(ae, name, observed)  # an instance attribute shadows the method, for this call only
    try:
        yield calls
    finally:
        if shadowed:
            setattr(ae, name, original)
        else:
            delattr(ae, name)


def _topk_of(encodes: list) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(indices, values) [B, k] of the first `encode(x, return_topk=True)` call, if any."""
    for _, kwargs, result in encodes:
        if kwargs.get("return_topk") and isinstance(result, tuple) and len(result) >= 3:
            _, values, indices = result[:3]
            return indices.reshape(-1, indices.shape[-1]), values.reshape(-1, values.shape[-1])
    return None


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
            scale=settings["ortho_scale"],
            backend=settings["ortho_backend"],
        )
        self.adaptive_tau = AdaptiveTau(
            init=settings["tau_init"],
            min=settings["tau_min"],
            max=settings["tau_max"],
            target=settings["tau_target"],
            calibration_steps=settings["tau_calibration_steps"],
        )
        self.orthogonality_penalty: torch.Tensor | float = float("nan")
        self.orthogonality_mean_abs_c: torch.Tensor | float = float("nan")
        self.logging_parameters = [*self.logging_parameters, "tau", "orthogonality_penalty", "orthogonality_mean_abs_c"]

    @property
    def tau(self) -> float:
        """τ of the next training step."""
        return self.adaptive_tau.tau

    def loss(self, x: torch.Tensor, step: int | None = None, logging: bool = False, **kwargs: Any) -> Any:
        with _observe(self.ae, "decode") as decodes, _observe(self.ae, "encode") as encodes:
            base = super().loss(x, step=step, logging=logging, **kwargs)  # type: ignore[misc]
        if not decodes:
            raise RuntimeError(
                f"{type(self.ae).__name__} never called decode() inside {type(self).__name__}.loss, so the "
                "latents are unknown: use a dictionary whose forward/encode path decodes with ae.decode(f)"
            )
        (f, *_), _, x_hat = decodes[0]
        topk = _topk_of(encodes)
        if topk is not None:
            penalty = self.orthogonality_loss.from_topk(*topk, f.shape[-1])
        else:
            penalty = self.orthogonality_loss(f.reshape(-1, f.shape[-1]))
        tau = self.adaptive_tau.tau
        ortho_loss = (self.orthogonality_coefficient * tau) * penalty
        self.orthogonality_penalty = penalty.detach()
        self.orthogonality_mean_abs_c = self.orthogonality_loss.last_mean_abs
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
