"""dictionary_learning integration: every trainer of dictionary_learning 0.1.0 with the
selective orthogonality penalty, through one wrapper (`add_orthogonality`).

    AosaeStandardTrainer             StandardTrainer (ReLU + L1, ConstrainedAdam)
    AosaeStandardTrainerAprilUpdate  StandardTrainerAprilUpdate (L1 · decoder norms, no constraint)
    AosaeTopKTrainer                 TopKTrainer (AuxK)
    AosaeBatchTopKTrainer            BatchTopKTrainer
    AosaeMatryoshkaBatchTopKTrainer  MatryoshkaBatchTopKTrainer (from trainers.matryoshka_batch_top_k)
    AosaeJumpReluTrainer             JumpReluTrainer
    AosaeGatedSAETrainer             GatedSAETrainer
    AosaeGatedAnnealTrainer          GatedAnnealTrainer
    AosaePAnnealTrainer              PAnnealTrainer
                                     each + c·τ·Σ_{top-k pairs}|C_ij| (C = gᵀg / B, g = f·‖decoder_i‖)

Use them wherever trainSAE takes a trainer class (all the trainer's own arguments work unchanged):

    from aosae.integrations.dictionary_learning import AosaeBatchTopKTrainer
    trainSAE(data=activation_buffer, steps=..., trainer_configs=[dict(
        trainer=AosaeBatchTopKTrainer, activation_dim=d, dict_size=n, k=64, layer=L, lm_name=name,
        ortho_fraction=0.005, tau_init=0.05)], device="cpu")

Penalty settings (extra keyword arguments of every trainer):
    orthogonality_coefficient=1.0  fixed factor c in front of τ
    ortho_scale="per_token"        C = gᵀg / B, the scale of the trainers' per-token MSE;
                                   "batch_sum" is the paper's literal C = gᵀg (B× larger)
    ortho_fraction=0.005, ortho_k=None, ortho_similarity="dot", ortho_reduction="sum",
    ortho_backend="auto"           as in aosae.TopKOrthoLoss
    adaptive_tau=True              τ ← clip(τ·L_target/L_mse, tau_min, tau_max) every step
    tau_init=0.05, tau_min=0.01, tau_max=0.1, tau_target=None, tau_calibration_steps=100
                                   as in aosae.AdaptiveTau (None: L_target = mean MSE of the
                                   first tau_calibration_steps steps); τ_max is half the paper's
                                   0.2, as in the SAELens adapter (τ sits at τ_max once
                                   reconstruction beats the early target)

How it hooks in: the trainer's own `loss` runs unchanged while the dictionary's `decode` and
`encode` are observed for the duration of the call. The latents f are the input of the first
decode (the reconstruction, not AuxK's), or, for a trainer that decodes by hand (Matryoshka),
the first encode's output; x̂ (for τ's MSE) is that decode's output, or decode(f) without
gradient. Each trainer hands the penalty what it holds (LATENT_FORMS, aosae.integrations.latents):
TopK its encode's (indices, values) (`return_topk=True`), the ReLU / Gated / BatchTopK trainers
the support of f (their activations zero the gradient off it: BatchTopK's encode returns dense
latents), JumpReLU the support plus its threshold STE's window (the pre-activations are
recomputed without gradient, as its loss computes them). A trainer given a dictionary class
other than its default gets the dense path (exact for any activation).
g = f·‖decoder column‖: the same as f under the unit-norm decoders most trainers keep; the
April-update trainer's L1 weighs latents by those norms too.

Logging calls (`loss(..., logging=True)`) add "orthogonality_loss", "orthogonality_penalty" and
"tau" to the loss log and leave τ alone; trainSAE's logger also reads the trainer attributes
"tau", "orthogonality_penalty" and "orthogonality_mean_abs_c" (the selected pairs' mean
|C_ij|) through `logging_parameters`.

τ is trainer state: trainSAE saves only `ae.state_dict()` and has no resume, so keep
`trainer.adaptive_tau.state_dict()` yourself if you resume by hand (`load_state_dict` restores
it). The saved ae.pt is the plain dictionary's: it loads with the dictionary class's own
`from_pretrained`.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterator, Optional

import torch

from aosae.integrations import check_version, missing_dependency_message

_missing = missing_dependency_message("dictionary_learning")
if _missing is not None:
    raise ImportError(_missing)

import dictionary_learning  # noqa: E402

check_version("dictionary_learning", getattr(dictionary_learning, "__version__", "unknown"))

from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer  # noqa: E402
from dictionary_learning.trainers.gated_anneal import GatedAnnealTrainer  # noqa: E402
from dictionary_learning.trainers.gdm import GatedSAETrainer  # noqa: E402
from dictionary_learning.trainers.jumprelu import JumpReluTrainer  # noqa: E402
from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer  # noqa: E402
from dictionary_learning.trainers.p_anneal import PAnnealTrainer  # noqa: E402
from dictionary_learning.trainers.standard import StandardTrainer, StandardTrainerAprilUpdate  # noqa: E402
from dictionary_learning.trainers.top_k import TopKTrainer  # noqa: E402

from aosae.integrations.latents import jumprelu_window  # noqa: E402
from aosae.integrations.latents import penalty as latent_penalty  # noqa: E402
from aosae.nn.loss import TopKOrthoLoss  # noqa: E402
from aosae.ops import backends  # noqa: E402
from aosae.nn.tau import AdaptiveTau  # noqa: E402

__all__ = ["LATENT_FORMS", "ORTHO_DEFAULTS", "TRAINERS", "add_orthogonality"]  # + every Aosae<Trainer> (end of module)

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
    latent_form: str = "dense"
    default_dict_class: Optional[type] = None  # the dictionary latent_form was chosen for

    @staticmethod
    def _pop_settings(kwargs: dict[str, Any]) -> dict[str, Any]:
        settings = {name: kwargs.pop(name, default) for name, default in ORTHO_DEFAULTS.items()}
        coefficient = settings["orthogonality_coefficient"]
        if not (isinstance(coefficient, (int, float)) and coefficient >= 0):
            raise ValueError(f"orthogonality_coefficient must be a number >= 0, got {coefficient!r}")
        backends.check_name(settings["ortho_backend"], "ortho_backend")
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
        self.logging_parameters = [*self.logging_parameters, "tau", "orthogonality_penalty", "orthogonality_mean_abs_c"]

    @property
    def orthogonality_mean_abs_c(self) -> torch.Tensor | float:
        """The last step's selected pairs' mean |C_ij|, read when logged (every log_steps): a
        penalty that summed every co-active pair without listing them makes its selection only then."""
        value = self.orthogonality_loss.last_mean_abs
        return float("nan") if value is None else value

    @property
    def tau(self) -> float:
        """τ of the next training step."""
        return self.adaptive_tau.tau

    def _latent_form(self) -> str:
        if self.default_dict_class is not None and type(self.ae) is not self.default_dict_class:
            return "dense"  # another dictionary: its activation's backward is unknown
        return self.latent_form

    def _check_batch(self, x: Any) -> None:
        """A batch of activations [B, activation_dim] on the dictionary's device, named before torch fails deep inside."""
        width = getattr(self.ae, "activation_dim", None)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{type(self).__name__}.loss needs a torch.Tensor of activations [B, {width}], got "
                            f"{type(x).__name__}")
        if x.dim() != 2 or (isinstance(width, int) and x.shape[-1] != width):
            raise ValueError(f"{type(self).__name__}.loss needs activations [B, activation_dim={width}], got shape "
                             f"{tuple(x.shape)}: reshape to [tokens, {width}] or check the layer's width")
        if not x.is_floating_point():
            raise TypeError(f"{type(self).__name__}.loss needs floating-point activations, got {x.dtype}: convert "
                            "with x.float()")
        device = next(self.ae.parameters()).device
        if x.device != device:
            raise ValueError(f"{type(self).__name__}.loss got activations on {x.device} but the dictionary is on "
                             f"{device}: pass x.to({str(device)!r})")

    def _window(self, x: torch.Tensor) -> torch.Tensor:
        """JumpReLU's STE window, from the pre-activations as JumpReluTrainer.loss computes them."""
        ae = self.ae
        with torch.no_grad():
            pre = x.to(ae.W_enc.dtype) @ ae.W_enc + ae.b_enc
        return jumprelu_window(pre, ae.threshold, self.bandwidth)

    def loss(self, x: torch.Tensor, step: int | None = None, logging: bool = False, **kwargs: Any) -> Any:
        self._check_batch(x)
        with _observe(self.ae, "decode") as decodes, _observe(self.ae, "encode") as encodes:
            base = super().loss(x, step=step, logging=logging, **kwargs)  # type: ignore[misc]
        if decodes:
            (f, *_), _, x_hat = decodes[0]
        elif encodes:
            result = encodes[0][2]
            f = result[0] if isinstance(result, tuple) else result
            with torch.no_grad():
                x_hat = self.ae.decode(f)
        else:
            raise RuntimeError(
                f"{type(self.ae).__name__} called neither decode() nor encode() inside {type(self).__name__}.loss, "
                "so the latents are unknown: use a dictionary whose loss path calls ae.encode or ae.decode(f)"
            )
        form = self._latent_form()
        topk = _topk_of(encodes) if form == "topk" else None
        if form == "topk" and topk is None:
            form = "support"  # no return_topk call seen: f's support is exact too (a TopK scatter)
        penalty = latent_penalty(
            self.orthogonality_loss, form, f.shape[-1], latents=f, weights=_decoder_norms(self.ae), topk=topk,
            window=self._window(x) if form == "window" else None,
        )
        tau = self.adaptive_tau.tau
        ortho_loss = (self.orthogonality_coefficient * tau) * penalty
        self.orthogonality_penalty = penalty.detach()
        if not logging:
            if self.ortho_settings["adaptive_tau"] and torch.is_grad_enabled():
                recon = (x - x_hat).detach().pow(2).sum(dim=-1).mean()
                self.adaptive_tau.update(recon)
            return base + ortho_loss.to(base.dtype)
        # The loss log: a LossLog namedtuple (.losses), or PAnnealTrainer's plain (x, x_hat, f, dict).
        losses = dict(base.losses if hasattr(base, "losses") else base[-1])
        losses["orthogonality_penalty"] = penalty.item()
        losses["orthogonality_loss"] = ortho_loss.item()
        losses["tau"] = tau
        if "loss" in losses:
            losses["loss"] = losses["loss"] + ortho_loss.item()
        return base._replace(losses=losses) if hasattr(base, "losses") else (*base[:-1], losses)

    @property
    def config(self) -> dict[str, Any]:
        config = dict(super().config)  # type: ignore[misc]
        config["trainer_class"] = type(self).__name__
        config.update(self.ortho_settings)
        return config


def _decoder_norms(ae: torch.nn.Module) -> Optional[torch.Tensor]:
    """‖decoder direction_i‖ per latent: nn.Linear decoders hold them as columns, W_dec [n, d] as rows."""
    decoder = getattr(ae, "decoder", None)
    if isinstance(decoder, torch.nn.Linear):
        return decoder.weight.norm(dim=0)
    W_dec = getattr(ae, "W_dec", None)
    if isinstance(W_dec, torch.Tensor):
        return W_dec.norm(dim=1)
    return None


# What each trainer's default dictionary hands the penalty, and why its gradient equals the dense
# one (tests/integrations/test_support_gradients.py, float64): see aosae.integrations.latents.
LATENT_FORMS: dict[type, str] = {
    StandardTrainer: "support",  # ReLU
    StandardTrainerAprilUpdate: "support",
    PAnnealTrainer: "support",
    GatedSAETrainer: "support",  # Heaviside gate × ReLU(magnitude)
    GatedAnnealTrainer: "support",
    TopKTrainer: "topk",  # encode(..., return_topk=True)'s (indices, values)
    BatchTopKTrainer: "support",  # encode returns dense latents: their non-zeros
    MatryoshkaBatchTopKTrainer: "support",
    JumpReluTrainer: "window",  # the threshold's STE reads the gradient at zeros near θ
}
TRAINERS: tuple[type, ...] = tuple(LATENT_FORMS)


def add_orthogonality(trainer: type) -> type:
    """`trainer` (a dictionary_learning SAETrainer subclass) with the penalty: a subclass named
    Aosae<Trainer> whose extra keyword arguments are ORTHO_DEFAULTS' (module docstring).
    Trainers not in LATENT_FORMS hand the penalty dense latents (exact for any activation)."""
    if not isinstance(trainer, type):
        raise TypeError(f"add_orthogonality needs a dictionary_learning trainer class (e.g. StandardTrainer), got "
                        f"{type(trainer).__name__} {trainer!r}")
    form = LATENT_FORMS.get(trainer, "dense")

    def __init__(self, *args: Any, **kwargs: Any):
        settings = self._pop_settings(kwargs)
        trainer.__init__(self, *args, **kwargs)
        self._init_orthogonality(settings)

    dict_class = inspect.signature(trainer.__init__).parameters.get("dict_class")
    return type(f"Aosae{trainer.__name__}", (_OrthogonalityPenalty, trainer), {
        "__doc__": f"dictionary_learning's {trainer.__name__} + the selective orthogonality penalty "
                   f"(latents: {form!r} form; keyword arguments: see the module docstring).",
        "__module__": __name__,
        "__init__": __init__,
        "latent_form": form,
        "default_dict_class": None if dict_class is None or dict_class.default is inspect.Parameter.empty
        else dict_class.default,
    })


for _trainer in TRAINERS:
    globals()[f"Aosae{_trainer.__name__}"] = add_orthogonality(_trainer)
__all__ += sorted(n for n in globals() if n.startswith("Aosae"))
