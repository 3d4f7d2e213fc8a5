"""SAELens integration: train any SAELens architecture with the selective orthogonality penalty,
convert formats.

Importing this module registers "aosae_<arch>" for every training architecture the installed
SAELens registers (ARCHITECTURES; SAELens 6.54: standard, gated, topk, abstopk, jumprelu,
batchtopk, matryoshka_batchtopk, matching_pursuit), all through one wrapper, `add_orthogonality`:

    config  Aosae<Arch>TrainingSAEConfig = the architecture's own training config (every field and
            default as there) + OrthogonalityFields (the penalty's settings)
    SAE     Aosae<Arch>TrainingSAE = the architecture's training SAE + _OrthogonalityPenalty, which
            adds the penalty through SAELens's auxiliary-loss hook (`calculate_aux_loss`)

registered with `register_sae_training_class` (SAELens's route for custom SAEs). Use them like any
SAELens architecture (LanguageModelSAETrainingRunner or SAETrainer):

    import aosae.integrations.saelens as aos
    cfg = LanguageModelSAERunnerConfig(sae=aos.AosaeBatchTopKTrainingSAEConfig(d_in=..., d_sae=..., k=64), ...)
    LanguageModelSAETrainingRunner(cfg).run()

The penalty is the loss "orthogonality_loss" = c · τ · Σ_{top-k pairs} |C_ij| with C = gᵀg / B (per
token, on the scale of SAELens's per-token mse_loss; `ortho_scale="batch_sum"` is the paper's
literal gᵀg). c is the "orthogonality" training coefficient (warmed up over
`orthogonality_warm_up_steps`), τ adapts every step with `aosae.AdaptiveTau` from the step's MSE.
g = f·‖W_dec_i‖, the latents as coefficients of unit-norm decoder rows (as SAELens's L1 weighs
them; with rescale_acts_by_decoder_norm, f already is).

Each architecture hands the penalty what it already holds (LATENT_FORMS; the forms and why each
gradient is exact: aosae.integrations.latents): TopK / AbsTopK their activation's (indices, values),
BatchTopK / Matryoshka BatchTopK the batch-wide selection as ragged rows (a different count per
token; TopKOrthoLoss.from_sparse, never padded), standard / gated / matching pursuit the support
of their latents (TopKOrthoLoss.on_support), JumpReLU its support plus the zeros inside the
threshold STE's window (the STE gives θ a gradient from them). An architecture without an entry
gets the dense path. Matching pursuit fits: its latents are a differentiable function of the
tied decoder, scattered from the selected atoms only.

Logged by SAELens's own logger (TrainStepOutput.losses → "losses/…", .metrics → "metrics/…"):
losses/orthogonality_loss, metrics/orthogonality_penalty (Σ|C_ij|), metrics/tau (τ of the
step) and metrics/orthogonality_mean_abs_c (the selected pairs' mean |C_ij|).

Checkpoints: SAETrainer.save_checkpoint calls the SAE's `save_model`, which here also writes
τ's state (aosae_tau.json); resuming (`resume_from_checkpoint`) calls
`load_weights_from_checkpoint`, which reads it back, so τ continues where it was. Finished
SAEs are saved as the plain architecture's inference SAE (readable without aosae; BatchTopK
ones as SAELens saves them, JumpReLU).

Supported SAELens: >= 6.54, < 7 (checked at import; CI pins 6.54.12).

Format conversion (aosae.integrations.saelens_export, re-exported here): `to_saelens` /
`export_to_saelens` and `from_saelens` / `import_from_saelens`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch

from aosae.integrations import check_version, missing_dependency_message

_missing = missing_dependency_message("sae_lens")
if _missing is not None:
    raise ImportError(_missing)

import sae_lens  # noqa: E402

check_version("sae_lens", sae_lens.__version__)

from sae_lens.registry import (  # noqa: E402
    SAE_CLASS_REGISTRY,
    SAE_TRAINING_CLASS_REGISTRY,
    register_sae_class,
    register_sae_training_class,
)
from sae_lens.saes.abstopk_sae import AbsTopK  # noqa: E402
from sae_lens.saes.batchtopk_sae import BatchTopK  # noqa: E402
from sae_lens.saes.sae import TrainCoefficientConfig, TrainStepInput, TrainStepOutput  # noqa: E402
from sae_lens.saes.topk_sae import TopK  # noqa: E402

from aosae.files import write_json  # noqa: E402
from aosae.integrations.latents import csr_offsets, jumprelu_window  # noqa: E402
from aosae.integrations.latents import penalty as latent_penalty  # noqa: E402
from aosae.integrations.saelens_export import (  # noqa: E402
    export_to_saelens,
    from_saelens,
    import_from_saelens,
    to_saelens,
)
from aosae.nn.loss import TopKOrthoLoss  # noqa: E402
from aosae.ops import backends  # noqa: E402
from aosae.nn.tau import AdaptiveTau  # noqa: E402

__all__ = [
    "ARCHITECTURES",
    "LATENT_FORMS",
    "ORTHOGONALITY",
    "OrthogonalityFields",
    "add_orthogonality",
    "export_to_saelens",
    "from_saelens",
    "import_from_saelens",
    "to_saelens",
]  # + every generated Aosae<Arch>TrainingSAE / ...Config (end of module)

ORTHOGONALITY = "orthogonality"  # name of the SAELens training coefficient
TAU_STATE_FILENAME = "aosae_tau.json"


# ----------------------------------------------------------------------------- configs


@dataclass(kw_only=True)
class OrthogonalityFields:
    """Settings of the penalty, shared by every aosae_<arch> training config (SAELens CLI flags).

    Attributes:
        orthogonality_coefficient: fixed factor c in c·τ·penalty (SAELens coefficient "orthogonality").
        orthogonality_warm_up_steps: steps over which SAELens ramps c linearly from 0.
        ortho_fraction: share of the d_sae(d_sae−1)/2 latent pairs penalised (paper: 0.005).
        ortho_k: exact number of pairs instead of ortho_fraction.
        ortho_similarity: "dot" (paper: |f_i·f_j|) or "cosine".
        ortho_reduction: "sum" (paper) or "mean" over the selected pairs.
        ortho_scale: "per_token" (C = fᵀf / B, default: the scale of mse_loss) or "batch_sum"
            (the paper's literal C = fᵀf, B× larger; collapses training at τ ∈ [0.01, 0.2]).
        ortho_backend: aosae.gram_topk backend for dense latents ("auto" picks the fastest usable one).
        adaptive_tau: adapt τ ← clip(τ·L_target/L_mse, tau_min, tau_max) every step; False keeps τ = tau_init.
        tau_init, tau_min, tau_max: τ₀ and its bounds. The paper's 0.05 in [0.01, 0.2], except τ_max
            0.1: the paper's rule calibrates L_target on the first steps, so reconstruction soon beats
            it and τ sits at τ_max; in a scratch run at d_sae 4096, a SAELens standard SAE lost 0.055
            explained variance to the plain arm at 0.2 and 0.030 at 0.1 (selected |C| still 27% lower).
        tau_target: L_target; None calibrates it as the mean MSE of the first tau_calibration_steps steps.
        tau_calibration_steps: steps averaged when calibrating L_target.
        normalize_decoder: renormalise each decoder row (latent) to unit L2 norm before every
            training step (the paper's constraint). Off by default: SAELens's objectives already
            ignore decoder norms (L1 on f·‖W_dec_i‖, TopK's rescale_acts_by_decoder_norm) and the
            penalty is taken on the same decoder-norm-weighted latents, while renormalising undoes
            SAELens's decoder_init_norm=0.1 initialisation (scratch run, standard SAE, synthetic
            data: explained variance 0.44 instead of 0.74).
    """

    orthogonality_coefficient: float = 1.0
    orthogonality_warm_up_steps: int = 0
    ortho_fraction: float = 0.005
    ortho_k: Optional[int] = None
    ortho_similarity: Literal["dot", "cosine"] = "dot"
    ortho_reduction: Literal["sum", "mean"] = "sum"
    ortho_scale: Literal["per_token", "batch_sum"] = "per_token"
    ortho_backend: str = "auto"
    adaptive_tau: bool = True
    tau_init: float = 0.05
    tau_min: float = 0.01
    tau_max: float = 0.1
    tau_target: Optional[float] = None
    tau_calibration_steps: int = 100
    normalize_decoder: bool = False

    def make_orthogonality_loss(self) -> TopKOrthoLoss:
        return TopKOrthoLoss(
            self.ortho_fraction,
            k=self.ortho_k,
            similarity=self.ortho_similarity,
            reduction=self.ortho_reduction,
            scale=self.ortho_scale,
            backend=self.ortho_backend,
        )

    def make_adaptive_tau(self) -> AdaptiveTau:
        return AdaptiveTau(
            init=self.tau_init,
            min=self.tau_min,
            max=self.tau_max,
            target=self.tau_target,
            calibration_steps=self.tau_calibration_steps,
        )

    def validate_orthogonality(self) -> None:
        """Raise ValueError now (at config time) rather than at the first training step."""
        backends.check_name(self.ortho_backend, "ortho_backend")
        if not (self.orthogonality_coefficient >= 0):
            raise ValueError(f"orthogonality_coefficient must be >= 0, got {self.orthogonality_coefficient}")
        if self.orthogonality_warm_up_steps < 0:
            raise ValueError(f"orthogonality_warm_up_steps must be >= 0, got {self.orthogonality_warm_up_steps}")
        self.make_orthogonality_loss()
        self.make_adaptive_tau()


@dataclass(kw_only=True)
class _OrthogonalityConfig(OrthogonalityFields):
    """Placed before the SAELens training config in the MRO: validates the penalty settings
    after the architecture's own __post_init__."""

    def __post_init__(self):
        super().__post_init__()  # type: ignore[misc]
        self.validate_orthogonality()


# ----------------------------------------------------------------------------- activations that keep their selection


class _RecordingTopK(TopK):
    """SAELens's TopK activation that also keeps this call's (indices, values) [tokens, k], so the
    penalty reads the kept latents directly instead of searching the dense output again."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values, indices = torch.topk(x, k=self.k, dim=-1, sorted=False)
        values = values.relu()
        self.last_topk = (indices.reshape(-1, self.k), values.reshape(-1, self.k))
        if not self.use_sparse_activations:
            return torch.zeros_like(x).scatter_(-1, indices, values)
        rows = torch.arange(values.numel() // self.k, device=x.device).repeat_interleave(self.k)
        coords = torch.unravel_index(rows, x.shape[:-1]) if x.dim() > 2 else (rows,)
        return torch.sparse_coo_tensor(torch.stack([*coords, indices.flatten()]), values.flatten(), x.shape)


class _RecordingAbsTopK(AbsTopK):
    """SAELens's AbsTopK (top k by |x|, signed values kept) that keeps its (indices, values)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        indices = torch.topk(x.abs(), k=self.k, dim=-1, sorted=False).indices
        values = x.gather(-1, indices)
        self.last_topk = (indices.reshape(-1, self.k), values.reshape(-1, self.k))
        return torch.zeros_like(x).scatter_(-1, indices, values)


class _RecordingBatchTopK(BatchTopK):
    """SAELens's BatchTopK (the k·tokens largest ReLU'd pre-activations of the whole batch) that
    keeps its selection as ragged CSR rows (offsets, latent ids, values): each token keeps a
    different number of latents, and the penalty takes them as they are (no padding)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acts = x.relu()
        flat = acts.flatten()
        n_tokens, n_latents = acts.shape[:-1].numel(), acts.shape[-1]
        top = torch.topk(flat, int(self.k * n_tokens), dim=-1)
        # Zeros (fewer positive pre-activations than k·tokens) are not co-active with anything
        # and ReLU gives them no gradient: dropping them changes neither value nor gradient.
        positive = top.values > 0
        flat_ids, order = top.indices[positive].sort()  # row-major: CSR order
        values = top.values[positive][order]
        rows = torch.div(flat_ids, n_latents, rounding_mode="floor")
        self.last_rows = (csr_offsets(rows, n_tokens), flat_ids - rows * n_latents, values)
        return torch.zeros_like(flat).scatter(-1, top.indices, top.values).reshape(acts.shape)


def _recording(activation: Any) -> Any:
    """The recording twin of a SAELens activation module, or the module itself if it has none."""
    kind = type(activation)
    if kind is TopK:
        return _RecordingTopK(activation.k, use_sparse_activations=activation.use_sparse_activations)
    if kind is AbsTopK:
        return _RecordingAbsTopK(activation.k)
    if kind is BatchTopK:
        return _RecordingBatchTopK(activation.k)
    return activation


# ----------------------------------------------------------------------------- the one wrapper

# What each SAELens training architecture hands the penalty (aosae.integrations.latents), and why
# that gradient equals the dense one (tests/integrations/test_support_gradients.py, float64):
LATENT_FORMS: dict[str, str] = {
    "standard": "support",  # ReLU: its backward zeroes the gradient where the latent is 0
    "gated": "support",  # Heaviside gate (no gradient) × ReLU(magnitude): zero off the non-zeros
    "matching_pursuit": "support",  # latents scattered from the selected atoms only
    "topk": "topk",  # the activation's own (indices, values)
    "abstopk": "topk",
    "batchtopk": "rows",  # the batch-wide selection as ragged rows
    "matryoshka_batchtopk": "rows",
    "jumprelu": "window",  # the threshold's STE reads the gradient at zeros near θ: see latents.py
}
DEFAULT_FORM = "dense"  # an architecture not listed: the dense path, exact for any activation


def _check_penalty_input(feature_acts: Any, hidden_pre: Any, d_sae: int) -> int:
    """orthogonality_penalty's inputs: latents [..., d_sae] with a batch dimension, and pre-activations
    of the same shape (a 1-D vector or another batch's rows would be penalised as something else).
    Returns the number of tokens; a type or width error is left to latent_penalty, which names it."""
    if not isinstance(feature_acts, torch.Tensor):
        return -1
    shape = tuple(feature_acts.shape)
    if feature_acts.dim() < 2:
        raise ValueError(f"orthogonality_penalty needs feature_acts [batch, d_sae={d_sae}] (or [..., d_sae]), got "
                         f"shape {shape}: add the batch dimension (feature_acts[None]) for a single token")
    if isinstance(hidden_pre, torch.Tensor) and tuple(hidden_pre.shape) != shape:
        raise ValueError(f"orthogonality_penalty needs hidden_pre of feature_acts' shape {shape}, got "
                         f"{tuple(hidden_pre.shape)}: pass the pre-activations of the same batch (encode_with_hidden_pre)")
    return int(torch.Size(shape[:-1]).numel())


class _OrthogonalityPenalty:
    """Mixin placed before a SAELens TrainingSAE: adds c·τ·penalty to its auxiliary losses."""

    cfg: Any
    latent_form: str = DEFAULT_FORM  # set per generated class from LATENT_FORMS

    def __init__(self, cfg: Any, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)  # type: ignore[call-arg]
        self.orthogonality_loss = self.cfg.make_orthogonality_loss()  # no parameters, no state_dict entries
        self.adaptive_tau = self.cfg.make_adaptive_tau()
        self._last_penalty: Optional[torch.Tensor] = None

    def get_activation_fn(self) -> Any:
        return _recording(super().get_activation_fn())  # type: ignore[misc]

    @property
    def tau(self) -> float:
        """τ used by the next training step."""
        return self.adaptive_tau.tau

    def get_coefficients(self) -> dict[str, Union[float, TrainCoefficientConfig]]:
        coefficients = dict(super().get_coefficients())  # type: ignore[misc]
        coefficients[ORTHOGONALITY] = TrainCoefficientConfig(
            value=self.cfg.orthogonality_coefficient,
            warm_up_steps=self.cfg.orthogonality_warm_up_steps,
        )
        return coefficients

    def _decoder_norm_weights(self) -> Optional[torch.Tensor]:
        """‖W_dec_i‖ per latent, or None where the latents already multiply unit-norm rows
        (rescale_acts_by_decoder_norm: decode divides by the norms)."""
        if getattr(self.cfg, "rescale_acts_by_decoder_norm", False):
            return None
        return self.W_dec.norm(dim=1)  # type: ignore[attr-defined]

    def orthogonality_penalty(self, feature_acts: torch.Tensor, hidden_pre: torch.Tensor) -> torch.Tensor:
        """The penalty of this step's latents as coefficients of unit-norm decoder rows
        (f_i·‖W_dec_i‖, as SAELens's own L1 weighs them), in the architecture's latent form."""
        activation = getattr(self, "activation_fn", None)
        topk = getattr(activation, "last_topk", None)
        rows = getattr(activation, "last_rows", None)
        if activation is not None:  # used once: never pair a later step's latents with them
            activation.last_topk = activation.last_rows = None
        tokens = _check_penalty_input(feature_acts, hidden_pre, self.cfg.d_sae)
        if topk is not None and topk[0].shape[0] != tokens:  # recorded for another batch: not these latents
            topk = None
        if rows is not None and rows[0].numel() - 1 != tokens:
            rows = None
        form = self.latent_form
        if (form == "topk" and topk is None) or (form == "rows" and rows is None):
            form = "support"  # the activation was replaced or bypassed: its dense output is exact too
        window = None
        if form == "window":
            window = jumprelu_window(hidden_pre.reshape(-1, hidden_pre.shape[-1]), self.threshold,  # type: ignore[attr-defined]
                                     self.cfg.jumprelu_bandwidth)
        return latent_penalty(self.orthogonality_loss, form, self.cfg.d_sae, latents=feature_acts,
                              weights=self._decoder_norm_weights(), topk=topk, rows=rows, window=window)

    def calculate_aux_loss(
        self,
        step_input: TrainStepInput,
        feature_acts: torch.Tensor,
        hidden_pre: torch.Tensor,
        sae_out: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        losses = super().calculate_aux_loss(  # type: ignore[misc]
            step_input=step_input, feature_acts=feature_acts, hidden_pre=hidden_pre, sae_out=sae_out
        )
        if not isinstance(losses, dict):
            losses = {"aux_loss": losses}
        penalty = self.orthogonality_penalty(feature_acts, hidden_pre)
        coefficient = step_input.coefficients.get(ORTHOGONALITY, self.cfg.orthogonality_coefficient)
        self._last_penalty = penalty.detach()
        losses = dict(losses)
        losses["orthogonality_loss"] = (coefficient * self.adaptive_tau.tau) * penalty.to(sae_out.dtype)
        return losses

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        if self.cfg.normalize_decoder and self.training:
            with torch.no_grad():
                W_dec = self.W_dec  # type: ignore[attr-defined]
                W_dec.div_(W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))
        tau_used = self.adaptive_tau.tau
        output = super().training_forward_pass(step_input)  # type: ignore[misc]
        if self.cfg.adaptive_tau and self.training and torch.is_grad_enabled():
            self.adaptive_tau.update(output.losses["mse_loss"].detach())
        output.metrics["tau"] = tau_used
        if self._last_penalty is not None:
            output.metrics["orthogonality_penalty"] = self._last_penalty
            output.metrics["orthogonality_mean_abs_c"] = self.orthogonality_loss.last_mean_abs
        return output

    # τ is training state, not a weight: it travels beside the checkpoint's weights.
    def save_model(self, path: Union[str, Path]) -> tuple[Path, Path]:
        paths = super().save_model(path)  # type: ignore[misc]
        write_json(Path(path) / TAU_STATE_FILENAME, self.adaptive_tau.state_dict())
        return paths

    def load_weights_from_checkpoint(self, checkpoint_path: Union[str, Path]) -> None:
        super().load_weights_from_checkpoint(checkpoint_path)  # type: ignore[misc]
        tau_file = Path(checkpoint_path) / TAU_STATE_FILENAME
        if not tau_file.exists():
            raise FileNotFoundError(
                f"{checkpoint_path} has no {TAU_STATE_FILENAME}: it was not written by an aosae training SAE, so "
                "τ cannot be resumed; start a fresh run or copy the file from the checkpoint that produced it"
            )
        self.adaptive_tau.load_state_dict(json.loads(tau_file.read_text()))


class _Architecture:
    """Stands in for a config instance where only architecture() is read (the inference config
    lookup of a base SAELens training config)."""

    def __init__(self, name: str):
        self.name = name

    def architecture(self) -> str:
        return self.name


def add_orthogonality(architecture: str) -> tuple[type, type]:
    """Register "aosae_<architecture>": SAELens's training architecture `architecture` (as in
    sae_lens.registry) with the penalty, and return (training SAE class, config class).

    The config class subclasses the architecture's own (every field and default unchanged) plus
    OrthogonalityFields; the SAE class subclasses its SAE class with _OrthogonalityPenalty, which
    hands the penalty the latents in LATENT_FORMS[architecture] (dense for one not listed).
    Finished SAEs save as the plain architecture's inference SAE. Idempotent.
    """
    name = f"aosae_{architecture}"
    if name in SAE_TRAINING_CLASS_REGISTRY:
        return SAE_TRAINING_CLASS_REGISTRY[name]
    if architecture not in SAE_TRAINING_CLASS_REGISTRY:
        raise ValueError(
            f"SAELens has no training architecture {architecture!r}; registered: {sorted(SAE_TRAINING_CLASS_REGISTRY)}"
        )
    base_sae, base_cfg = SAE_TRAINING_CLASS_REGISTRY[architecture]
    stem = base_sae.__name__.removesuffix("TrainingSAE")
    cfg_cls = dataclass(kw_only=True)(type(f"Aosae{stem}TrainingSAEConfig", (_OrthogonalityConfig, base_cfg), {
        "__doc__": f"SAELens {base_cfg.__name__} (every field as there) plus the penalty settings (OrthogonalityFields).",
        "__module__": __name__,
        "architecture": classmethod(lambda cls: name),
    }))
    form = LATENT_FORMS.get(architecture, DEFAULT_FORM)
    sae_cls = type(f"Aosae{stem}TrainingSAE", (_OrthogonalityPenalty, base_sae), {
        "__doc__": f"SAELens {base_sae.__name__} with the orthogonality penalty (latents: {form!r} form, "
                   f"aosae.integrations.latents). Losses: the architecture's own plus orthogonality_loss.",
        "__module__": __name__,
        "latent_form": form,
    })
    register_sae_training_class(name, sae_cls, cfg_cls)
    if architecture in SAE_CLASS_REGISTRY and name not in SAE_CLASS_REGISTRY:
        # Lets sae_lens.SAE.load_from_disk read aosae_* training checkpoints as inference SAEs,
        # where SAELens reads the plain architecture's (it has no inference class for batchtopk).
        register_sae_class(name, *SAE_CLASS_REGISTRY[architecture])
    globals()[sae_cls.__name__], globals()[cfg_cls.__name__] = sae_cls, cfg_cls
    return sae_cls, cfg_cls


# Every training architecture the installed SAELens registers (aosae_* ones excluded).
ARCHITECTURES: tuple[str, ...] = tuple(a for a in SAE_TRAINING_CLASS_REGISTRY if not a.startswith("aosae_"))
for _architecture in ARCHITECTURES:
    add_orthogonality(_architecture)

AosaeStandardTrainingSAE, AosaeStandardTrainingSAEConfig = SAE_TRAINING_CLASS_REGISTRY["aosae_standard"]
AosaeTopKTrainingSAE, AosaeTopKTrainingSAEConfig = SAE_TRAINING_CLASS_REGISTRY["aosae_topk"]
__all__ += sorted(n for n in globals() if n.startswith("Aosae"))
