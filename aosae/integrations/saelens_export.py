"""aosae <-> SAELens format conversion (part of aosae.integrations.saelens, which re-exports it).

`to_saelens` / `export_to_saelens` turn an aosae SparseAutoencoder into a SAELens SAE /
directory that `sae_lens.SAE.load_from_disk` reads without aosae; `from_saelens` /
`import_from_saelens` do the reverse (for aosae's evaluation).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Union

import torch

from aosae.integrations import missing_dependency_message

_missing = missing_dependency_message("sae_lens")
if _missing is not None:
    raise ImportError(_missing)

from sae_lens import SAE, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig  # noqa: E402
from sae_lens.saes.sae import SAEMetadata  # noqa: E402

__all__ = ["export_to_saelens", "from_saelens", "import_from_saelens", "to_saelens"]

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

    if not callable(getattr(getattr(sae, "cfg", None), "architecture", None)):
        raise TypeError(f"from_saelens needs a SAELens SAE (sae_lens.SAE or a training SAE), got {type(sae).__name__}; "
                        "for a directory use import_from_saelens(path)")
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
        return _import_directory(Path(source), device, fold_decoder_norm)
    if not isinstance(source, SAE):
        raise TypeError(f"import_from_saelens expects a directory or a sae_lens SAE, got {type(source).__name__}")
    return from_saelens(source, fold_decoder_norm=fold_decoder_norm).to(device)


def _import_directory(directory: Path, device, fold_decoder_norm: bool) -> Any:
    """A SAELens SAE directory, its files checked first: every way they can be wrong is one
    aosae.files.BadFile (a ValueError) naming the file, never an error from deep inside SAELens."""
    from aosae.files import BadFile, MissingFile, load_tensors, read_json

    fix = "write it again (sae_lens SAE.save_model, or `aosae export RUN --to saelens`) or download it again"
    if not directory.is_dir():
        raise MissingFile(directory, "is not a directory" if directory.exists() else "does not exist",
                          "pass a directory written by SAELens (cfg.json + sae_weights.safetensors)")
    cfg = read_json(directory / "cfg.json", fix)  # missing, empty, cut short, not JSON
    if cfg.get("architecture") in _TOPK and cfg.get("k") is None and "activation_fn_kwargs" not in cfg:
        # SAELens would fill in its default k (100): a TopK SAE must say how many latents it keeps
        raise BadFile(directory / "cfg.json", "describes a topk SAE but has no 'k' (the latents kept per token)",
                      'add "k": <the k it was trained with> to it, or write it again with SAELens')
    weights_path = directory / "sae_weights.safetensors"
    tensors = load_tensors(weights_path, fix)  # missing, cut short, trailing bytes, not safetensors
    ints = [f"{name} ({str(t.dtype).removeprefix('torch.')})" for name, t in tensors.items()
            if not t.dtype.is_floating_point]
    if ints:  # SAELens would convert them silently: weights that were rounded to integers are not an SAE
        raise BadFile(weights_path, f"{', '.join(ints)} must be floating point (SAE weights)",
                      "save the weights as float32 (or float16/bfloat16) again; " + fix)
    bad = [name for name, t in tensors.items() if t.dtype.is_floating_point and not bool(torch.isfinite(t).all())]
    if bad:
        raise BadFile(weights_path, f"{', '.join(bad)} hold(s) NaN/Inf values", fix)
    try:
        sae = SAE.load_from_disk(str(directory), device=str(device))
    except Exception as err:  # SAELens raises KeyError, TypeError, RuntimeError (shapes), ... for a bad cfg.json
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
        first = lines[0] if lines else ""
        keys = [line for line in lines if line.startswith(("Unexpected key", "Missing key", "size mismatch"))]
        if first.startswith("Error(s) in loading state_dict") and keys:  # torch's first line names no tensor
            first = "; ".join(keys)[:300]
            raise BadFile(weights_path, f"does not fit the SAE its cfg.json describes ({first})", fix) from err
        raise BadFile(directory, f"SAELens cannot load it ({type(err).__name__}: {first}); its cfg.json and "
                      "sae_weights.safetensors may disagree or lack a field", fix) from err
    try:
        converted = from_saelens(sae, fold_decoder_norm=fold_decoder_norm)
    except (ValueError, TypeError) as err:  # settings aosae cannot take, or that do not fit together
        raise BadFile(directory / "cfg.json", f"describes an SAE aosae cannot import: {err}",
                      "check its settings against the weights (see aosae.integrations.saelens.from_saelens)") from err
    return converted.to(device)
