"""The sparse autoencoder: x̂ = W_decᵀ·act(W_encᵀ(x − b_dec) + b_enc) + b_dec.

act: ReLU, TopK (the k largest per token) or BatchTopK (the B·k largest of the batch in
training; a JumpReLU threshold kept by EMA at inference, as SAELens and dictionary_learning do).
The forward pass encodes to sparse latents (aosae.ops.sparse_coding) and decodes from them, so a
training step never builds the dense [B, d_sae] latents (a ReLU SAE does while they are dense).

Layout (SAELens-compatible): W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in]
(one unit-norm row per latent), b_dec [d_in]. A saved SAE is a directory with
cfg.json + sae_weights.safetensors; loading never goes through pickle.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
from torch import nn

from aosae.files import replace_file_atomically, save_tensors, write_dir_atomically, write_json
from aosae.nn.sae_output import SAEOutput
from aosae.ops import kept_gradients
from aosae.ops.latent_selection import release_tile_buffer, select
from aosae.ops.sparse_coding import SparseLatents, sparse_decode, sparse_encode

ACTIVATIONS = ("relu", "topk", "batchtopk")
K_ACTIVATIONS = ("topk", "batchtopk")  # the activations that take top_k
# BatchTopK's inference threshold: an EMA of the smallest kept activation of each training batch,
# at SAELens's rate (BatchTopKTrainingSAEConfig.topk_threshold_lr = 0.01); unset (−1) until the
# first training step (dictionary_learning's convention), and saved as SAELens's JumpReLU threshold.
THRESHOLD_LR = 0.01
# A ReLU SAE decodes sparsely once its latents are sparse enough, i.e. once the mean number of
# non-zeros per token is at most this share of d_sae; above it the dense products are faster.
# Why here (benchmarks/NOTES.md, "The ReLU step after the dense phase, quiet"; d_sae 16384, d_in
# 576, B 2048, 2 cores, the whole step with AdamW): sparse ÷ dense = 0.38 at 2.7 % density, 0.47
# at 5 %, 0.71 at 7.5 %, 0.81 at 11.5 %, 1.89 at 31.5 %. Past 5 % the saving is under 2× and the
# sparse path's cost keeps growing with density while the dense path's does not. Each kept entry
# costs four gathers of a d-row (≈ 4·d·4 bytes of memory traffic) against ≈ 8·d FLOPs per latent
# and token of the dense products, so the crossover is a density, whatever d_sae. A ReLU SAE starts
# near 50 % and falls below 1 % within its first steps.
RELU_SPARSE_DENSITY = 0.05
WEIGHT_KEYS = ("W_enc", "b_enc", "W_dec", "b_dec")
WEIGHTS_FILE = "sae_weights.safetensors"
CFG_FILE = "cfg.json"


@dataclass
class SAEConfig:
    """Shape and provenance of an SAE.

    d_in: width of the hooked activations; d_sae: number of latents;
    activation: "relu", "topk" (keep the k largest pre-activations, ReLU'd) or "batchtopk"
    (keep the top_k·B largest of a batch of B tokens in training, k per token on average; at
    inference, the pre-activations above the SAE's threshold).
    The provenance fields are recorded in cfg.json for loaders such as SAELens.
    """

    d_in: int
    d_sae: int
    activation: Literal["relu", "topk", "batchtopk"] = "relu"
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
        if self.activation in K_ACTIVATIONS:
            if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.d_sae:
                raise ValueError(f"activation={self.activation!r} needs an int top_k in [1, d_sae={self.d_sae}], "
                                 f"got top_k={self.top_k!r}")
        elif self.top_k is not None:
            raise ValueError(f"top_k is only used with activation='topk' or 'batchtopk' "
                             f"(got top_k={self.top_k} with {self.activation!r})")
        if not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise ValueError(f"dtype must name a torch dtype such as 'float32', got {self.dtype!r}")

    def to_json_dict(self) -> dict:
        """The SAELens-style cfg.json content. A BatchTopK SAE is saved the way SAELens saves a
        trained one (BatchTopKTrainingSAE.process_state_dict_for_saving_inference): as a JumpReLU
        SAE whose threshold (one per latent, all equal) is the EMA threshold; activation_fn_str
        "batchtopk" and activation_fn_kwargs.k tell aosae what it was trained as."""
        architecture = {"topk": "topk", "batchtopk": "jumprelu"}.get(self.activation, "standard")
        return {
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "architecture": architecture,
            "activation_fn_str": self.activation,
            "activation_fn_kwargs": {"k": self.top_k} if self.activation in K_ACTIVATIONS else {},
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
        if activation not in ACTIVATIONS:  # before asking for the k only topk and batchtopk take
            raise ValueError(f"activation_fn_str {activation!r} is not supported: aosae SAEs use "
                             f"{', '.join(ACTIVATIONS)}")
        kwargs = get("activation_fn_kwargs", dict, {})
        k = None
        if activation != "relu":  # the k of topk / batchtopk
            k = kwargs.get("k", d.get("k"))
            if isinstance(k, bool) or not isinstance(k, int):
                raise ValueError(f"a {activation} SAE needs an int activation_fn_kwargs.k, got {k!r}")
        dtype = get("dtype", str, "float32").removeprefix("torch.")
        if not isinstance(getattr(torch, dtype, None), torch.dtype) or not getattr(torch, dtype).is_floating_point:
            raise ValueError(f"'dtype' must name a floating torch dtype such as 'float32', got {dtype!r}")
        return cls(
            d_in=get("d_in", int, required=True),
            d_sae=get("d_sae", int, required=True),
            activation=activation,
            top_k=k,
            model_name=get("model_name", str),
            hook_layer=get("hook_layer", int),
            hook_name=get("hook_name", str),
            context_size=get("context_size", int),
            dtype=dtype,
            extra=dict(get("aosae", dict, {})),
        )


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
        # W_enc [d_in, d_sae] is stored column-major (the transpose of a [d_sae, d_in] buffer): the
        # sparse backward builds its gradient latent by latent, i.e. in that layout (no transpose)
        self.W_enc = nn.Parameter(w_dec.to(dtype).clone().t())
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dtype))
        if cfg.activation == "batchtopk":  # the inference threshold, −1 until the first training step
            self.register_buffer("threshold", torch.tensor(-1.0))
        self._dense_last = True  # ReLU: whether the last forward's latents were too dense for the sparse path

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
        if isinstance(x, torch.Tensor) and x.layout != torch.strided:
            raise TypeError(f"{what} must be a dense tensor [..., {width}], got a "
                            f"{str(x.layout).removeprefix('torch.')} tensor: convert it with {what}.to_dense()")
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != width:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{what} must be a tensor [..., {width}], got {shape}")
        if x.device != self.W_enc.device:  # a meta tensor (no values) too
            raise ValueError(f"{what} is on {x.device} but the SAE's weights are on {self.W_enc.device}: pass {what} on the "
                             f"SAE's device ({what}.to(sae.W_enc.device)), or move the SAE (sae.to(device))")

    def _flat_input(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x, self.d_in, "x")
        x = x.to(self.W_enc.dtype) if not torch.is_autocast_enabled() else x
        return x.reshape(-1, self.d_in)

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_in] -> (x − b_dec) @ W_enc + b_enc, [..., d_sae]."""
        self._check_input(x, self.d_in, "x")
        x = x.to(self.W_enc.dtype) if not torch.is_autocast_enabled() else x
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def _rule(self, train: bool) -> tuple[str, dict]:
        """The selection of sparse_encode for this SAE: (activation, its arguments). BatchTopK
        uses the batch's top B·k in training (and at inference until its threshold is set) and
        its threshold otherwise (JumpReLU, as the SAE SAELens loads from its files)."""
        act = self.cfg.activation
        if act == "batchtopk" and not train and float(self.threshold) >= 0:
            return "jumprelu", {"threshold": self.threshold.to(self.W_enc.dtype)}
        return act, {"k": self.cfg.top_k}

    def activate(self, pre: torch.Tensor, *, train: bool = False) -> torch.Tensor:
        """pre-activations [..., d_sae] -> latents f [..., d_sae] (dense; ReLU, TopK or BatchTopK)."""
        if self.cfg.activation == "relu":
            return torch.relu(pre)
        if self.cfg.activation == "topk":
            idx, values = self.select_topk(pre)
            return torch.zeros_like(pre).scatter(-1, idx, values)
        act, kw = self._rule(train)
        flat = pre.reshape(-1, self.d_sae)
        offsets, indices, _ = select(flat.detach(), act, **kw)
        rows = torch.repeat_interleave(torch.arange(flat.shape[0], device=pre.device), offsets.diff())
        mask = torch.zeros_like(flat, dtype=torch.bool).index_put_((rows, indices), torch.ones_like(rows, dtype=torch.bool))
        return (flat * mask).reshape(pre.shape)

    def select_topk(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """TopK SAEs: pre-activations [..., d_sae] -> (indices [..., top_k] int64, ReLU'd
        values [..., top_k]), the non-zeros of activate(pre) (plus kept slots that ReLU zeroed)."""
        if self.cfg.activation != "topk":
            raise ValueError(f"select_topk needs a TopK SAE, this one has activation={self.cfg.activation!r}")
        values, idx = pre.topk(self.cfg.top_k, dim=-1)
        return idx, torch.relu(values)

    @staticmethod
    def _check_finite(flat: torch.Tensor) -> None:
        # NaN/Inf would be dropped by a selection (x_hat silently b_dec) or leak into the latents. Checked
        # at inference only: a scan and a sync per call; in training the step's non-finite-loss guard reports it
        if not bool(torch.isfinite(torch.linalg.vector_norm(flat, float("inf")))):  # one pass, no [B, d] temporary
            raise ValueError("x holds NaN or Inf values: the SAE cannot encode them (x_hat would silently be b_dec); "
                             "check the activations (torch.isfinite(x).all())")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_in] -> f [..., d_sae] (dense; encode_sparse gives the kept entries only)."""
        self._check_finite(self._flat_input(x))
        return self.activate(self.pre_activations(x))

    def encode_sparse(self, x: torch.Tensor, *, train: bool = False) -> SparseLatents:
        """x [..., d_in] -> the kept latents of the flattened tokens, as SparseLatents (values
        differentiable; their gradient reaches the encoder at the kept entries only)."""
        flat = self._flat_input(x)
        if not train:
            self._check_finite(flat)
        act, kw = self._rule(train)
        return sparse_encode(flat, self.W_enc, self.b_enc, self.b_dec, act, **kw)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """f [..., d_sae] -> x̂ [..., d_in] = f @ W_dec + b_dec."""
        self._check_input(f, self.d_sae, "f")
        if not f.is_floating_point():
            raise TypeError(f"f must be a floating-point tensor (latent activations), got {f.dtype}: pass "
                            f"f.to(sae.W_dec.dtype)")
        return f @ self.W_dec + self.b_dec

    def decode_sparse(self, latents: SparseLatents) -> torch.Tensor:
        """SparseLatents of B tokens -> x̂ [B, d_in], reading W_dec's kept rows only."""
        return sparse_decode(latents, self.W_dec, self.b_dec)

    def forward(self, x: torch.Tensor, *, train: bool = False) -> SAEOutput:
        """Encode to sparse latents and decode from them (a ReLU SAE whose latents are dense,
        more than RELU_SPARSE_DENSITY·d_sae non-zeros per token, stays dense: the dense
        products are then faster). train=True: BatchTopK selects the batch's top B·k (its
        training rule) instead of applying its threshold; the other activations ignore it."""
        flat = self._flat_input(x)
        if not train:
            self._check_finite(flat)
        lead = x.shape[:-1]
        act, kw = self._rule(train)
        shape = (*lead, self.d_sae)
        max_nnz = int(RELU_SPARSE_DENSITY * self.d_sae * flat.shape[0]) if act == "relu" else None
        if act in ("topk", "batchtopk") or (act == "relu" and not getattr(self, "_dense_last", True)):
            # the pre-activations only if read (on CPU outside autocast none is kept: TopK's are never
            # written whole, BatchTopK's and ReLU's go to a buffer reused every call)
            latents = sparse_encode(flat, self.W_enc, self.b_enc, self.b_dec, act, **kw, max_nnz=max_nnz)
            if latents is not None:
                x_hat = self.decode_sparse(latents).reshape(*lead, self.d_in)
                return SAEOutput(x_hat, self._pre_acts_on_access(flat, shape), latents,
                                 top_k=self.cfg.top_k if act == "topk" else None, shape=shape)
        latents, pre = sparse_encode(flat, self.W_enc, self.b_enc, self.b_dec, act, **kw,
                                     return_pre=True, max_nnz=max_nnz)
        if act == "relu":  # (dense: the next call starts from the dense pre-activations it then needs)
            self._dense_last = latents is None
        pre = pre.reshape(shape)
        if latents is None:  # dense phase of a ReLU SAE
            f = torch.relu(pre)
            return SAEOutput(self.decode(f), pre, latents=f)
        x_hat = self.decode_sparse(latents).reshape(*lead, self.d_in)
        return SAEOutput(x_hat, pre, latents)

    def _pre_acts_on_access(self, flat: torch.Tensor, shape: tuple):
        """What computes this forward's pre-activations when they are first read: from the same
        input and parameters, under the forward's autocast and grad modes (so differentiable, as the
        forward's own), or an error if any of them has changed in place since (an optimizer step).
        Writes through `.data` bypass the version counters and so this check."""
        params = (self.W_enc, self.b_enc, self.b_dec)
        watched = (*params, flat)
        versions = tuple(t._version for t in watched)
        device = flat.device.type
        autocast, autocast_dtype = torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
        grad = torch.is_grad_enabled()

        def pre_acts() -> torch.Tensor:
            if tuple(t._version for t in watched) != versions:
                raise RuntimeError(
                    "SAEOutput.pre_acts of a sparse forward pass are computed when first read, and the SAE's weights "
                    "or its input have changed since its forward pass (an optimizer step?): read "
                    "out.pre_acts before changing them, or call sae.pre_activations(x) for the current weights")
            W_enc, b_enc, b_dec = params
            with torch.autocast(device, dtype=autocast_dtype, enabled=autocast), torch.set_grad_enabled(grad):
                return torch.addmm(b_enc, flat - b_dec, W_enc).reshape(shape)
        return pre_acts

    @torch.no_grad()
    def update_threshold_(self, latents: SparseLatents) -> None:
        """BatchTopK: move the inference threshold towards the smallest kept activation of this
        training batch (an EMA at rate THRESHOLD_LR, computed in float64; the first batch sets it)."""
        if self.cfg.activation != "batchtopk":
            raise ValueError(f"update_threshold_ is for BatchTopK SAEs, this one has activation={self.cfg.activation!r}")
        positive = latents.values.detach()
        positive = positive[positive > 0]
        if positive.numel() == 0:
            return
        low = positive.min().double()
        old = self.threshold.double()
        new = low if float(old) < 0 else (1 - THRESHOLD_LR) * old + THRESHOLD_LR * low
        self.threshold.copy_(new.to(self.threshold.dtype))

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale each row of W_dec (one latent's direction) to unit L2 norm, in place."""
        norms = self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_dec.div_(norms)

    @torch.no_grad()
    def remove_parallel_grads_(self) -> None:
        """Drop from W_dec.grad the component along each row, so a step only rotates the
        unit-norm rows (the part along the row would be undone by normalize_decoder_)."""
        grad, w = self.W_dec.grad, self.W_dec
        if grad is None:
            return
        # g −= (g·w / ‖w‖²) w, per row. On CPU in blocks of ≈ 2²⁰ entries: whole-matrix temporaries
        # ([d_sae, d_in], three of them) are page-faulted afresh every step, 0.6–1.1 s at d_sae
        # 262144, d_in 576, against 0.11 s in blocks (benchmarks/NOTES.md, ninth pass)
        rows = max(1, w.shape[0] if w.device.type != "cpu" else 2**20 // max(1, w.shape[1]))
        tiny = torch.finfo(w.dtype).tiny  # a zero row: 0 / tiny, nothing removed (1e-24 is 0 in half precision)
        for start in range(0, w.shape[0], rows):
            g, v = grad[start:start + rows], w[start:start + rows]
            along = (g * v).sum(dim=1, keepdim=True).div_((v * v).sum(dim=1, keepdim=True).clamp_min_(tiny))
            g.addcmul_(v, along, value=-1)

    def release_kept_memory(self) -> None:
        """Frees the memory the sparse step keeps between steps on CPU, e.g. once training is over in
        a long-lived process: W_enc's and W_dec's gradients' (aosae.ops.kept_gradients) and this
        thread's pre-activation tile (aosae.ops.latent_selection.tile_buffer, made again when needed)."""
        for weight in (self.W_enc, self.W_dec):
            kept_gradients.release(weight)
        release_tile_buffer()

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
        """The tensors of sae_weights.safetensors: the four weights, and for BatchTopK the
        threshold as SAELens's JumpReLU stores it, one per latent ([d_sae], all equal)."""
        tensors = {name: getattr(self, name).detach().contiguous().cpu() for name in WEIGHT_KEYS}
        if self.cfg.activation == "batchtopk":
            tensors["threshold"] = self.threshold.detach().to(self.b_enc.dtype).cpu().expand(self.d_sae).contiguous()
        return tensors

    @torch.no_grad()
    def load_extra_tensors_(self, tensors: dict[str, torch.Tensor], where: str = "the weights file") -> None:
        """Set what state_tensors adds beside the four weights (BatchTopK: the threshold, [d_sae]
        all equal or a 0-d tensor); a ValueError naming `where` if it is missing or not one value."""
        if self.cfg.activation != "batchtopk":
            return
        t = tensors.get("threshold")
        if t is None:
            raise ValueError(f"{where} has no 'threshold' tensor, which a BatchTopK (JumpReLU) SAE needs")
        t = t.detach().reshape(-1).to(self.threshold.device)
        if t.numel() not in (1, self.d_sae) or not bool(torch.isfinite(t).all()) or not bool((t == t[0]).all()):
            raise ValueError(f"{where}: 'threshold' must be one finite value per latent, all equal (BatchTopK's "
                             f"global threshold), got shape {tuple(t.shape)}; per-latent JumpReLU thresholds are not supported")
        self.threshold.copy_(t[0].to(self.threshold.dtype))

    def save(self, directory: str | os.PathLike) -> Path:
        """Write directory/cfg.json and directory/sae_weights.safetensors; returns the path.

        A new directory is filled in a temp directory and renamed into place. In an existing
        directory (a run directory, say) only these two files are replaced, each atomically
        (temp file + rename): every other file there (checkpoints, metrics, the user's own) is
        left alone. A path that is an existing file is refused (ValueError), never moved aside."""
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise ValueError(f"{directory} is a file, not a directory: SparseAutoencoder.save writes a directory "
                             "(cfg.json + sae_weights.safetensors); pass a directory path (it is created if missing)")
        if not directory.exists():
            return write_dir_atomically(directory, self.write_files)
        # weights first: a crash between the two renames leaves the old cfg.json, which load checks
        # against the weights' shapes, rather than a cfg.json that describes weights not yet written
        replace_file_atomically(directory / WEIGHTS_FILE, lambda tmp: save_tensors(tmp, self.state_tensors()))
        replace_file_atomically(directory / CFG_FILE, lambda tmp: write_json(tmp, self.cfg.to_json_dict()))
        return directory

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

        _check_device(device)  # before the files are read
        cfg, tensors = read_sae_files(directory)
        sae = cls(cfg)
        with torch.no_grad():
            for name in WEIGHT_KEYS:  # copy_ keeps each parameter's layout (W_enc is column-major) and dtype
                getattr(sae, name).copy_(tensors[name])
        path = Path(directory) / WEIGHTS_FILE
        try:  # what some activations keep beside the weights (BatchTopK's threshold)
            sae.load_extra_tensors_(tensors, str(path))
        except ValueError as err:
            from aosae.files import BadFile
            from aosae.nn.sae_files import FIX

            raise BadFile(path, str(err).removeprefix(f"{path}: ").removeprefix(f"{path} "), FIX) from err
        return sae.to(device)


def _check_device(device) -> None:
    """SparseAutoencoder.load's device: one torch knows and this machine has."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r}") from err
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} but CUDA is not available here: pass device='cpu'")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} but this machine has {torch.cuda.device_count()} GPU(s): use an index below "
                         f"{torch.cuda.device_count()}")
