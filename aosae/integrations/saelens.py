"""SAELens integration: train with the selective orthogonality penalty, convert formats.

Importing this module registers two training architectures with SAELens's registry:

    "aosae_standard"  SAELens's standard (ReLU + L1) training SAE  + τ·orthogonality penalty
    "aosae_topk"      SAELens's TopK training SAE (with its AuxK)   + τ·orthogonality penalty

Use them like any SAELens architecture:

    import aosae.integrations.saelens as aos
    cfg = LanguageModelSAERunnerConfig(sae=aos.AosaeStandardTrainingSAEConfig(d_in=..., d_sae=...), ...)
    LanguageModelSAETrainingRunner(cfg).run()

The penalty enters through SAELens's auxiliary-loss hook (`calculate_aux_loss`) as the
loss term "orthogonality_loss" = c · τ · Σ_{top-k pairs} |C_ij|, where c is the
"orthogonality" training coefficient (SAELens warms it up over
`orthogonality_warm_up_steps`) and τ adapts every step with `aosae.AdaptiveTau` from the
step's MSE. τ and the raw penalty are logged as metrics "tau" / "orthogonality_penalty".

Finished SAEs are saved as plain SAELens "standard" / "topk" SAEs (`save_inference_model`),
so `sae_lens.SAE.load_from_disk` reads them without aosae installed; training checkpoints
keep the "aosae_*" architecture (and τ's state in aosae_tau.json) for resuming.

Format conversion: `to_saelens` / `export_to_saelens` turn an aosae SparseAutoencoder into a
SAELens SAE / directory; `from_saelens` / `import_from_saelens` do the reverse (for
aosae's evaluation).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch

from aosae.integrations import missing_dependency_message

_missing = missing_dependency_message("sae_lens")
if _missing is not None:
    raise ImportError(_missing)

from sae_lens import SAE, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig  # noqa: E402
from sae_lens.registry import (  # noqa: E402
    SAE_CLASS_REGISTRY,
    SAE_TRAINING_CLASS_REGISTRY,
    register_sae_class,
    register_sae_training_class,
)
from sae_lens.saes.sae import SAEMetadata, TrainCoefficientConfig, TrainStepInput, TrainStepOutput  # noqa: E402
from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig  # noqa: E402
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig  # noqa: E402

from aosae.nn.loss import TopKOrthoLoss  # noqa: E402
from aosae.nn.tau import AdaptiveTau  # noqa: E402

__all__ = [
    "ORTHOGONALITY",
    "AosaeStandardTrainingSAE",
    "AosaeStandardTrainingSAEConfig",
    "AosaeTopKTrainingSAE",
    "AosaeTopKTrainingSAEConfig",
    "export_to_saelens",
    "from_saelens",
    "import_from_saelens",
    "to_saelens",
]

ORTHOGONALITY = "orthogonality"  # name of the SAELens training coefficient
TAU_STATE_FILENAME = "aosae_tau.json"


# ----------------------------------------------------------------------------- configs


@dataclass(kw_only=True)
class OrthogonalityFields:
    """Settings of the penalty, shared by both aosae training configs (SAELens CLI flags).

    Attributes:
        orthogonality_coefficient: fixed factor c in c·τ·penalty (SAELens coefficient "orthogonality").
        orthogonality_warm_up_steps: steps over which SAELens ramps c linearly from 0.
        ortho_fraction: share of the d_sae(d_sae−1)/2 latent pairs penalised (paper: 0.005).
        ortho_k: exact number of pairs instead of ortho_fraction.
        ortho_similarity: "dot" (paper: |f_i·f_j|) or "cosine".
        ortho_reduction: "sum" (paper) or "mean" over the selected pairs.
        ortho_backend: aosae.gram_topk backend ("auto" picks the fastest usable one).
        adaptive_tau: adapt τ ← clip(τ·L_target/L_mse, tau_min, tau_max) every step; False keeps τ = tau_init.
        tau_init, tau_min, tau_max: τ₀ and its bounds (paper: 0.05 in [0.01, 0.2]).
        tau_target: L_target; None calibrates it as the mean MSE of the first tau_calibration_steps steps.
        tau_calibration_steps: steps averaged when calibrating L_target.
        normalize_decoder: renormalise each decoder row (latent) to unit L2 norm before every
            training step, i.e. after the previous optimiser step (the paper's constraint).
    """

    orthogonality_coefficient: float = 1.0
    orthogonality_warm_up_steps: int = 0
    ortho_fraction: float = 0.005
    ortho_k: Optional[int] = None
    ortho_similarity: Literal["dot", "cosine"] = "dot"
    ortho_reduction: Literal["sum", "mean"] = "sum"
    ortho_backend: str = "auto"
    adaptive_tau: bool = True
    tau_init: float = 0.05
    tau_min: float = 0.01
    tau_max: float = 0.2
    tau_target: Optional[float] = None
    tau_calibration_steps: int = 100
    normalize_decoder: bool = True

    def make_orthogonality_loss(self) -> TopKOrthoLoss:
        return TopKOrthoLoss(
            self.ortho_fraction,
            k=self.ortho_k,
            similarity=self.ortho_similarity,
            reduction=self.ortho_reduction,
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
        if not (self.orthogonality_coefficient >= 0):
            raise ValueError(f"orthogonality_coefficient must be >= 0, got {self.orthogonality_coefficient}")
        if self.orthogonality_warm_up_steps < 0:
            raise ValueError(f"orthogonality_warm_up_steps must be >= 0, got {self.orthogonality_warm_up_steps}")
        self.make_orthogonality_loss()
        self.make_adaptive_tau()


@dataclass(kw_only=True)
class AosaeStandardTrainingSAEConfig(StandardTrainingSAEConfig, OrthogonalityFields):
    """SAELens StandardTrainingSAEConfig (l1_coefficient, ...) plus the penalty settings."""

    @classmethod
    def architecture(cls) -> str:
        return "aosae_standard"

    def get_inference_config_class(self) -> type:
        # Trained SAEs are saved as plain "standard" SAEs: readable without aosae.
        return StandardSAEConfig

    def __post_init__(self):
        super().__post_init__()
        self.validate_orthogonality()


@dataclass(kw_only=True)
class AosaeTopKTrainingSAEConfig(TopKTrainingSAEConfig, OrthogonalityFields):
    """SAELens TopKTrainingSAEConfig (k, aux_loss_coefficient, ...) plus the penalty settings."""

    @classmethod
    def architecture(cls) -> str:
        return "aosae_topk"

    def get_inference_config_class(self) -> type:
        return TopKSAEConfig

    def __post_init__(self):
        super().__post_init__()
        self.validate_orthogonality()


# ----------------------------------------------------------------------------- training SAEs


class _OrthogonalityPenalty:
    """Mixin for a SAELens TrainingSAE: adds c·τ·penalty to its auxiliary losses."""

    cfg: Any

    def _init_orthogonality(self) -> None:
        self.orthogonality_loss = self.cfg.make_orthogonality_loss()  # no parameters, no state_dict entries
        self.adaptive_tau = self.cfg.make_adaptive_tau()
        self._last_penalty: Optional[torch.Tensor] = None

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
        acts = feature_acts.to_dense() if feature_acts.is_sparse else feature_acts
        penalty = self.orthogonality_loss(acts.reshape(-1, acts.shape[-1]))
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
        return output

    # τ is training state, not a weight: it travels beside the checkpoint's weights.
    def save_model(self, path: Union[str, Path]) -> tuple[Path, Path]:
        paths = super().save_model(path)  # type: ignore[misc]
        (Path(path) / TAU_STATE_FILENAME).write_text(json.dumps(self.adaptive_tau.state_dict()))
        return paths

    def load_weights_from_checkpoint(self, checkpoint_path: Union[str, Path]) -> None:
        super().load_weights_from_checkpoint(checkpoint_path)  # type: ignore[misc]
        tau_file = Path(checkpoint_path) / TAU_STATE_FILENAME
        if tau_file.exists():
            self.adaptive_tau.load_state_dict(json.loads(tau_file.read_text()))


class AosaeStandardTrainingSAE(_OrthogonalityPenalty, StandardTrainingSAE):
    """SAELens standard training SAE (ReLU, L1 · decoder norm) with the orthogonality penalty.

    Losses (TrainStepOutput.losses): mse_loss, l1_loss, orthogonality_loss.
    """

    def __init__(self, cfg: AosaeStandardTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self._init_orthogonality()


class AosaeTopKTrainingSAE(_OrthogonalityPenalty, TopKTrainingSAE):
    """SAELens TopK training SAE (with AuxK for dead latents) with the orthogonality penalty.

    Losses: mse_loss, auxiliary_reconstruction_loss, orthogonality_loss.
    """

    def __init__(self, cfg: AosaeTopKTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self._init_orthogonality()


def _register() -> None:
    # Idempotent: SAELens raises on a second registration (e.g. importlib.reload).
    for name, train_cls, train_cfg, infer_cls, infer_cfg in (
        ("aosae_standard", AosaeStandardTrainingSAE, AosaeStandardTrainingSAEConfig, StandardSAE, StandardSAEConfig),
        ("aosae_topk", AosaeTopKTrainingSAE, AosaeTopKTrainingSAEConfig, TopKSAE, TopKSAEConfig),
    ):
        if name not in SAE_TRAINING_CLASS_REGISTRY:
            register_sae_training_class(name, train_cls, train_cfg)
        if name not in SAE_CLASS_REGISTRY:
            # Lets sae_lens.SAE.load_from_disk read aosae_* training checkpoints as inference SAEs.
            register_sae_class(name, infer_cls, infer_cfg)


_register()


# ----------------------------------------------------------------------------- format conversion

_STANDARD = ("standard", "aosae_standard")
_TOPK = ("topk", "aosae_topk")


def to_saelens(sae: Any, *, device: Union[str, torch.device] = "cpu") -> SAE:
    """An aosae SparseAutoencoder as an equivalent SAELens inference SAE (StandardSAE / TopKSAE).

    Weights are copied unchanged (same names and shapes: W_enc [d_in, d_sae], b_enc [d_sae],
    W_dec [d_sae, d_in], b_dec [d_in]; same dtype); SAELens's encode/decode then give the same
    latents and reconstructions. Provenance (model_name, hook_name, context_size, hook_layer)
    goes into the SAELens metadata.
    """
    from aosae.nn.sae import SparseAutoencoder

    if not isinstance(sae, SparseAutoencoder):
        raise TypeError(f"to_saelens expects an aosae.SparseAutoencoder, got {type(sae).__name__}")
    cfg = sae.cfg
    dtype = str(sae.W_enc.dtype).removeprefix("torch.")
    metadata = SAEMetadata(
        model_name=getattr(cfg, "model_name", None),
        hook_name=getattr(cfg, "hook_name", None),
        hook_layer=getattr(cfg, "hook_layer", None),
        context_size=getattr(cfg, "context_size", None),
        aosae=dict(getattr(cfg, "extra", {}) or {}),
    )
    common = dict(
        d_in=cfg.d_in,
        d_sae=cfg.d_sae,
        dtype=dtype,
        device=str(device),
        apply_b_dec_to_input=True,
        normalize_activations="none",
        metadata=metadata,
    )
    if cfg.activation == "relu":
        out: SAE = StandardSAE(StandardSAEConfig(**common))
    elif cfg.activation == "topk":
        out = TopKSAE(TopKSAEConfig(k=int(cfg.top_k), rescale_acts_by_decoder_norm=False, **common))
    else:
        raise ValueError(f"cannot convert an aosae SAE with activation {cfg.activation!r} (supported: relu, topk)")
    state = {name: getattr(sae, name).detach().to(device) for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    out.load_state_dict(state, strict=True)
    return out


def export_to_saelens(sae: Any, path: Union[str, Path]) -> Path:
    """Write an aosae SparseAutoencoder as a SAELens SAE directory.

    The directory holds cfg.json + sae_weights.safetensors as SAELens writes them, so
    `sae_lens.SAE.load_from_disk(path)` loads it (no aosae needed). Returns the path.
    """
    path = Path(path)
    to_saelens(sae).save_model(path)
    return path


def from_saelens(sae: SAE, *, fold_decoder_norm: bool = False) -> Any:
    """A SAELens SAE (inference or training; standard or topk) as an aosae SparseAutoencoder.

    Exact conversions that keep reconstructions identical (up to fp rounding):
      - apply_b_dec_to_input=False: b_dec's effect on the encoder is folded into b_enc.
      - TopK with rescale_acts_by_decoder_norm=True: decoder norms are folded into the encoder
        (as SAELens does when saving), giving unit-norm decoder rows.
      - fold_decoder_norm=True (standard only): decoder rows scaled to unit norm, the norms moved
        into W_enc/b_enc (ReLU is positively homogeneous, so x̂ is unchanged; latents are scaled).
    Not convertible (ValueError): other architectures, normalize_activations other than "none",
    hook_z reshaping.
    """
    from aosae.nn.sae import SAEConfig, SparseAutoencoder

    cfg = sae.cfg
    arch = cfg.architecture()
    if arch not in _STANDARD + _TOPK:
        raise ValueError(
            f"cannot import a SAELens {arch!r} SAE into aosae: only standard and topk SAEs are supported"
        )
    if cfg.normalize_activations != "none":
        raise ValueError(
            f"cannot import a SAELens SAE with normalize_activations={cfg.normalize_activations!r}: aosae SAEs "
            "read raw activations; fold the normalisation into the weights first "
            "(e.g. sae.fold_activation_norm_scaling_factor(factor)) and set it to 'none'"
        )
    if getattr(cfg, "reshape_activations", "none") != "none":
        raise ValueError("cannot import a SAELens SAE with reshape_activations='hook_z': aosae SAEs take flat vectors")

    with torch.no_grad():
        W_enc = sae.W_enc.detach().clone()
        b_enc = sae.b_enc.detach().clone()
        W_dec = sae.W_dec.detach().clone()
        b_dec = sae.b_dec.detach().clone()
        if not cfg.apply_b_dec_to_input:
            # aosae computes (x − b_dec)·W_enc + b_enc; SAELens here computes x·W_enc + b_enc.
            b_enc = b_enc + (b_dec.to(torch.float64) @ W_enc.to(torch.float64)).to(b_enc.dtype)
        is_topk = arch in _TOPK
        rescale = is_topk and bool(getattr(cfg, "rescale_acts_by_decoder_norm", False))
        if rescale or (fold_decoder_norm and not is_topk):
            norms = W_dec.norm(dim=1).clamp_min(1e-12)
            W_enc = W_enc * norms
            b_enc = b_enc * norms
            W_dec = W_dec / norms[:, None]
        elif fold_decoder_norm and is_topk:
            raise ValueError(
                "fold_decoder_norm=True would change which latents a TopK SAE selects unless it was trained "
                "with rescale_acts_by_decoder_norm=True; import it with fold_decoder_norm=False"
            )

    metadata = cfg.metadata
    hook_name = metadata.get("hook_name")
    hook_layer = metadata.get("hook_layer")
    if hook_layer is None and isinstance(hook_name, str):
        match = re.search(r"blocks\.(\d+)\.", hook_name)
        hook_layer = int(match.group(1)) if match else None
    provenance = {
        "model_name": metadata.get("model_name"),
        "hook_name": hook_name,
        "hook_layer": hook_layer,
        "context_size": metadata.get("context_size"),
    }
    aosae_cfg = SAEConfig(
        d_in=cfg.d_in,
        d_sae=cfg.d_sae,
        activation="topk" if is_topk else "relu",
        top_k=int(cfg.k) if is_topk else None,
        dtype=str(W_enc.dtype).removeprefix("torch."),
        **{key: value for key, value in provenance.items() if value is not None},
    )
    out = SparseAutoencoder(aosae_cfg).to(device=W_enc.device, dtype=W_enc.dtype)
    out.load_state_dict({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}, strict=True)
    return out


def import_from_saelens(
    source: Union[str, Path, SAE],
    *,
    device: Union[str, torch.device] = "cpu",
    fold_decoder_norm: bool = False,
) -> Any:
    """Load a SAELens SAE (a directory written by SAELens, or an SAE object) as an aosae SAE.

    Directories are read with `sae_lens.SAE.load_from_disk`, so every on-disk format SAELens
    reads (including older cfg.json layouts) works. See from_saelens for what is converted.
    """
    if isinstance(source, (str, Path)):
        directory = Path(source)
        if not (directory / "cfg.json").is_file():
            raise FileNotFoundError(f"{directory} is not a SAELens SAE directory (no cfg.json)")
        source = SAE.load_from_disk(str(directory), device=str(device))
    elif not isinstance(source, SAE):
        raise TypeError(f"import_from_saelens expects a directory or a sae_lens SAE, got {type(source).__name__}")
    return from_saelens(source, fold_decoder_norm=fold_decoder_norm).to(device)
