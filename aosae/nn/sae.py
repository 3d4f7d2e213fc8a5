"""The sparse autoencoder: x̂ = W_decᵀ·act(W_encᵀ(x − b_dec) + b_enc) + b_dec.

Layout (SAELens-compatible): W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in]
(one unit-norm row per latent), b_dec [d_in]. A saved SAE is a directory with
cfg.json + sae_weights.safetensors; loading never goes through pickle.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple, Optional

import torch
from torch import nn

from aosae.files import save_tensors, write_dir_atomically, write_json

ACTIVATIONS = ("relu", "topk")
WEIGHT_KEYS = ("W_enc", "b_enc", "W_dec", "b_dec")
WEIGHTS_FILE = "sae_weights.safetensors"
CFG_FILE = "cfg.json"


@dataclass
class SAEConfig:
    """Shape and provenance of an SAE.

    d_in: width of the hooked activations; d_sae: number of latents;
    activation: "relu" or "topk" (keep the k largest pre-activations, ReLU'd).
    The provenance fields are recorded in cfg.json for loaders such as SAELens.
    """

    d_in: int
    d_sae: int
    activation: Literal["relu", "topk"] = "relu"
    top_k: Optional[int] = None
    model_name: Optional[str] = None
    hook_layer: Optional[int] = None
    hook_name: Optional[str] = None
    context_size: Optional[int] = None
    dtype: str = "float32"
    extra: dict = field(default_factory=dict)  # aosae-specific metadata (training recipe, ...)

    def __post_init__(self):
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.activation == "topk":
            if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.d_sae:
                raise ValueError(f"activation='topk' needs an int top_k in [1, d_sae={self.d_sae}], got top_k={self.top_k!r}")
        elif self.top_k is not None:
            raise ValueError(f"top_k is only used with activation='topk' (got top_k={self.top_k} with {self.activation!r})")
        if not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise ValueError(f"dtype must name a torch dtype such as 'float32', got {self.dtype!r}")

    def to_json_dict(self) -> dict:
        """The SAELens-style cfg.json content."""
        return {
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "architecture": "topk" if self.activation == "topk" else "standard",
            "activation_fn_str": self.activation,
            "activation_fn_kwargs": {"k": self.top_k} if self.activation == "topk" else {},
            "apply_b_dec_to_input": True,
            "normalize_activations": "none",
            "model_name": self.model_name,
            "hook_name": self.hook_name,
            "hook_layer": self.hook_layer,
            "context_size": self.context_size,
            "dtype": self.dtype,
            "aosae": dict(self.extra),
        }

    @classmethod
    def from_json_dict(cls, d: dict) -> "SAEConfig":
        """The config of a cfg.json (aosae's or SAELens's standard/topk layout), type-checked:
        ValueError naming the key that is missing or wrong."""
        if not isinstance(d, dict):
            raise TypeError(f"an SAE config is a JSON object, got {type(d).__name__}")

        def get(key, kinds, default=None, required=False):
            if key not in d or d[key] is None:
                if required:
                    raise ValueError(f"it has no {key!r} (keys: {', '.join(map(repr, d)) or 'none'})")
                return default
            value = d[key]
            if isinstance(value, bool) or not isinstance(value, kinds):
                names = " or ".join(k.__name__ for k in (kinds if isinstance(kinds, tuple) else (kinds,)))
                raise ValueError(f"{key!r} must be {names}, got {value!r}")
            return value

        arch = get("architecture", str)
        activation = get("activation_fn_str", str, "topk" if arch in ("topk", "aosae_topk") else "relu")
        # aosae saves a BatchTopK SAE as SAELens's JumpReLU with activation_fn_str "batchtopk"
        if arch is not None and arch not in ("standard", "topk", "aosae_standard", "aosae_topk") \
                and (arch, activation) != ("jumprelu", "batchtopk"):
            raise ValueError(f"architecture {arch!r} is not supported: aosae loads standard (ReLU) and topk SAEs "
                             "(and the BatchTopK SAEs it saves)")
        if get("normalize_activations", str, "none") != "none":
            raise ValueError(f"normalize_activations={d['normalize_activations']!r}: aosae SAEs read raw activations; "
                             "load it with aosae.integrations.saelens.import_from_saelens (it says how to fold it)")
        if d.get("apply_b_dec_to_input") is False:
            raise ValueError("apply_b_dec_to_input=false: load it with aosae.integrations.saelens.import_from_saelens, "
                             "which folds b_dec into b_enc")
        kwargs = get("activation_fn_kwargs", dict, {})
        k = None
        if activation != "relu":  # the k of topk / batchtopk
            k = kwargs.get("k", d.get("k"))
            if isinstance(k, bool) or not isinstance(k, int):
                raise ValueError(f"a {activation} SAE needs an int activation_fn_kwargs.k, got {k!r}")
        return cls(
            d_in=get("d_in", int, required=True),
            d_sae=get("d_sae", int, required=True),
            activation=activation,
            top_k=k,
            model_name=get("model_name", str),
            hook_layer=get("hook_layer", int),
            hook_name=get("hook_name", str),
            context_size=get("context_size", int),
            dtype=get("dtype", str, "float32").removeprefix("torch."),
            extra=dict(get("aosae", dict, {})),
        )


class SAEOutput(NamedTuple):
    """x_hat [..., d_in]: reconstruction; latents [..., d_sae]: f (after the activation);
    pre_acts [..., d_sae]: encoder pre-activations (before ReLU / TopK).

    TopK SAEs also return the kept latents sparsely (None for ReLU): topk_indices
    [..., top_k] int64 and topk_values [..., top_k] (ReLU'd, differentiable), with
    latents[..., topk_indices] = topk_values. The penalty reads these
    (TopKOrthoLoss.from_topk) instead of searching the dense latents again.
    """

    x_hat: torch.Tensor
    latents: torch.Tensor
    pre_acts: torch.Tensor
    topk_indices: Optional[torch.Tensor] = None
    topk_values: Optional[torch.Tensor] = None


class SparseAutoencoder(nn.Module):
    """A one-layer SAE with tied-at-init weights (W_enc = W_decᵀ) and unit-norm decoder rows."""

    def __init__(self, cfg: SAEConfig, *, generator: Optional[torch.Generator] = None):
        super().__init__()
        if not isinstance(cfg, SAEConfig):
            raise TypeError(f"cfg must be an SAEConfig, got {type(cfg).__name__} (use SparseAutoencoder.from_dims)")
        self.cfg = cfg
        dtype = getattr(torch, cfg.dtype)
        # Random unit directions for the decoder, the encoder starts as its transpose
        # so every latent initially reads the direction it writes.
        w_dec = torch.randn(cfg.d_sae, cfg.d_in, generator=generator, dtype=torch.float32)
        w_dec = w_dec / w_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_dec = nn.Parameter(w_dec.to(dtype))
        self.W_enc = nn.Parameter(w_dec.t().contiguous().to(dtype))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dtype))

    @classmethod
    def from_dims(cls, d_in: int, d_sae: int, activation: str = "relu", top_k: Optional[int] = None, **kw):
        return cls(SAEConfig(d_in=d_in, d_sae=d_sae, activation=activation, top_k=top_k, **kw))

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    def _check_input(self, x: torch.Tensor, width: int, what: str) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != width:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{what} must be a tensor [..., {width}], got {shape}")

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_in] -> (x − b_dec) @ W_enc + b_enc, [..., d_sae]."""
        self._check_input(x, self.d_in, "x")
        x = x.to(self.W_enc.dtype) if not torch.is_autocast_enabled() else x
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """pre-activations [..., d_sae] -> latents f [..., d_sae] (ReLU, or ReLU of the top k)."""
        if self.cfg.activation == "relu":
            return torch.relu(pre)
        idx, values = self.select_topk(pre)
        return torch.zeros_like(pre).scatter(-1, idx, values)

    def select_topk(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """TopK SAEs: pre-activations [..., d_sae] -> (indices [..., top_k] int64, ReLU'd
        values [..., top_k]), the non-zeros of activate(pre) (plus kept slots that ReLU zeroed)."""
        if self.cfg.activation != "topk":
            raise ValueError(f"select_topk needs a TopK SAE, this one has activation={self.cfg.activation!r}")
        values, idx = pre.topk(self.cfg.top_k, dim=-1)
        return idx, torch.relu(values)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_in] -> f [..., d_sae]."""
        return self.activate(self.pre_activations(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """f [..., d_sae] -> x̂ [..., d_in] = f @ W_dec + b_dec."""
        self._check_input(f, self.d_sae, "f")
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> SAEOutput:
        pre = self.pre_activations(x)
        if self.cfg.activation == "relu":
            f = torch.relu(pre)
            return SAEOutput(self.decode(f), f, pre)
        idx, values = self.select_topk(pre)
        f = torch.zeros_like(pre).scatter(-1, idx, values)
        return SAEOutput(self.decode(f), f, pre, idx, values)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale each row of W_dec (one latent's direction) to unit L2 norm, in place."""
        norms = self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_dec.div_(norms)

    @torch.no_grad()
    def remove_parallel_grads_(self) -> None:
        """Drop from W_dec.grad the component along each row, so a step only rotates the
        unit-norm rows (the part along the row would be undone by normalize_decoder_)."""
        if self.W_dec.grad is None:
            return
        w = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        parallel = (self.W_dec.grad * w).sum(dim=1, keepdim=True)
        self.W_dec.grad.sub_(parallel * w)

    @torch.no_grad()
    def init_b_dec_(self, x: torch.Tensor, method: str = "geometric_median", iters: int = 20) -> None:
        """Set b_dec from a sample x [n, d_in]: its mean, or its geometric median (Weiszfeld)."""
        self._check_input(x, self.d_in, "x")
        x = x.reshape(-1, self.d_in).float()
        center = x.mean(dim=0)
        if method == "geometric_median":
            for _ in range(iters):
                w = 1.0 / (x - center).norm(dim=1).clamp_min(1e-6)
                center = (w[:, None] * x).sum(0) / w.sum()
        elif method != "mean":
            raise ValueError(f"method must be 'mean' or 'geometric_median', got {method!r}")
        self.b_dec.copy_(center.to(self.b_dec.dtype))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name).detach().contiguous().cpu() for name in WEIGHT_KEYS}

    def save(self, directory: str | os.PathLike) -> Path:
        """Write directory/cfg.json and directory/sae_weights.safetensors atomically
        (a temp directory next to it, fsync'd, then renamed over); returns the path."""
        return write_dir_atomically(directory, self.write_files)

    def write_files(self, directory: Path) -> None:
        """Write cfg.json + weights into an existing directory, fsync'ing both (not atomic by itself)."""
        save_tensors(directory / WEIGHTS_FILE, self.state_tensors())  # with a checksum, fsync'd
        write_json(directory / CFG_FILE, self.cfg.to_json_dict())

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> "SparseAutoencoder":
        """Load an SAE saved by `save` (or a SAELens-style standard/topk SAE directory).

        Every file is checked first (aosae.nn.sae_files): a missing, damaged or inconsistent file
        raises aosae.files.BadFile (a ValueError) naming it and what to do."""
        from aosae.nn.sae_files import read_sae_files

        cfg, tensors = read_sae_files(directory)
        sae = cls(cfg)
        with torch.no_grad():
            for name in WEIGHT_KEYS:
                param = getattr(sae, name)
                param.data = tensors[name].to(param.dtype)
        if hasattr(sae, "load_extra_tensors_"):  # what some activations keep beside the weights (a threshold)
            from aosae.files import BadFile
            from aosae.nn.sae_files import FIX

            path = Path(directory) / WEIGHTS_FILE
            try:
                sae.load_extra_tensors_(tensors, str(path))
            except ValueError as err:
                raise BadFile(path, str(err).removeprefix(f"{path}: ").removeprefix(f"{path} "), FIX) from err
        return sae.to(device)
