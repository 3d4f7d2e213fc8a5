"""Reading a saved SAE directory (cfg.json + sae_weights.safetensors), checked end to end.

Every way the files can be wrong (missing, empty, cut short, not JSON / not safetensors, keys
missing or unexpected, wrong types, shapes that disagree with cfg.json, non-float dtypes, NaN/Inf weights, a
checksum that no longer matches) is one aosae.files.BadFile naming the file and what to do.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from aosae.files import BadFile, MissingFile, load_tensors, read_json, verify_tensors
from aosae.nn.sae import CFG_FILE, WEIGHT_KEYS, WEIGHTS_FILE

FIX = ("restore both files from a copy (a run's checkpoints/step_<N>/ hold the SAE at step N), re-save the SAE "
       "with SparseAutoencoder.save, or train it again")


def expected_shapes(cfg) -> dict[str, tuple[int, ...]]:
    return {"W_enc": (cfg.d_in, cfg.d_sae), "b_enc": (cfg.d_sae,), "W_dec": (cfg.d_sae, cfg.d_in), "b_dec": (cfg.d_in,)}


def read_sae_config(directory: str | os.PathLike, fix: str = FIX):
    """The SAEConfig of directory/cfg.json."""
    from aosae.nn.sae import SAEConfig

    path = Path(directory) / CFG_FILE
    d = read_json(path, fix)
    try:
        cfg = SAEConfig.from_json_dict(d)
    except (ValueError, TypeError) as err:
        raise BadFile(path, f"is not a usable SAE config: {err}", fix) from err
    check_sae_config_values(cfg, path, fix)
    return cfg


def _number(value, least: float, above: bool = False) -> bool:
    import math

    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and (value > least if above else value >= least))


# what aosae records beside the SAE (cfg.json's "aosae" object): the run's settings and its activation scale
EXTRA_CHECKS = {
    "activation_scale": (lambda v: _number(v, 0, above=True), "a positive number"),
    "l1": (lambda v: _number(v, 0), "a number >= 0"),
    "fraction": (lambda v: _number(v, 0, above=True) and v <= 1, "a number in (0, 1]"),
    "tokens": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive int"),
    "dataset": (lambda v: isinstance(v, str), "a string"),
    "similarity": (lambda v: isinstance(v, str), "a string"),
    "ortho": (lambda v: isinstance(v, bool), "true or false"),
}


def check_sae_config_values(cfg, path: Path, fix: str) -> None:
    """The provenance fields of cfg.json (hook layer, context, aosae's own record), which the SAE
    itself does not use but `aosae eval` and the SAELens export do."""
    layer, context = cfg.hook_layer, cfg.context_size
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or layer < 0):
        raise BadFile(path, f"'hook_layer' must be an int >= 0, got {layer!r}", fix)
    if context is not None and (isinstance(context, bool) or not isinstance(context, int) or context < 2):
        raise BadFile(path, f"'context_size' must be an int >= 2 (BOS + at least one token), got {context!r}", fix)
    for key, value in (cfg.extra or {}).items():
        check, what = EXTRA_CHECKS.get(key, (None, None))
        if check is not None and not check(value):
            raise BadFile(path, f"'aosae.{key}' must be {what}, got {value!r}", fix)


def read_sae_weights(directory: str | os.PathLike, cfg, fix: str = FIX) -> dict[str, torch.Tensor]:
    """The tensors of directory/sae_weights.safetensors (on CPU); the four weights checked against cfg."""
    path = Path(directory) / WEIGHTS_FILE
    tensors = load_tensors(path, fix, verify=False)  # a missing or misshapen tensor is named before the checksum
    missing = [k for k in WEIGHT_KEYS if k not in tensors]
    if missing:
        raise BadFile(path, f"has no tensor(s) {', '.join(missing)} (it holds: {', '.join(sorted(tensors)) or 'none'})", fix)
    known = set(WEIGHT_KEYS) | ({"threshold"} if cfg.activation == "batchtopk" else set())
    extra = sorted(set(tensors) - known)
    if extra:  # another architecture's file (a JumpReLU's threshold, a gated SAE's r_mag): loading it would drop them
        raise BadFile(path, f"holds tensor(s) {', '.join(map(repr, extra))} that a {cfg.activation} SAE does not have "
                      f"(expected only {', '.join(sorted(known))}): the file is of another SAE architecture, or its "
                      f"{CFG_FILE} names the wrong activation", fix)
    for name, want in expected_shapes(cfg).items():
        t = tensors[name]
        if not t.dtype.is_floating_point:
            raise BadFile(path, f"{name} has dtype {str(t.dtype).removeprefix('torch.')}; SAE weights are floating point", fix)
        if tuple(t.shape) != want:
            raise BadFile(path, f"{name} has shape {tuple(t.shape)} but {path.parent / CFG_FILE} (d_in={cfg.d_in}, d_sae={cfg.d_sae}) "
                          f"needs {want}: the two files belong to different SAEs", fix)
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise BadFile(path, f"{name} holds {bad} NaN/Inf value(s) of {t.numel()} (a diverged run or a damaged file)", fix)
    verify_tensors(path, fix, tensors)  # on the bytes as stored, before any conversion
    odd = {name: str(tensors[name].dtype).removeprefix("torch.") for name in WEIGHT_KEYS
           if tensors[name].dtype != getattr(torch, cfg.dtype)}
    if odd:  # loaded anyway (the SAE is exact up to rounding): said, so that a mix-up is not silent
        import warnings

        warnings.warn(f"{path}: {', '.join(f'{k} is {v}' for k, v in odd.items())} but {path.parent / CFG_FILE} says "
                      f"dtype {cfg.dtype}: converted to {cfg.dtype} (re-save the SAE to make them agree)", stacklevel=3)
    return tensors  # the four weights, and whatever else the file holds (a BatchTopK threshold)


def check_sae_dir(directory: str | os.PathLike, fix: Optional[str] = None) -> Path:
    """The directory as a Path; MissingFile if it is not there, BadFile if it is a file."""
    directory = Path(directory)
    hint = fix or "pass a run directory written by `aosae train` or a directory written by SparseAutoencoder.save"
    if not directory.exists():
        raise MissingFile(directory, "does not exist", hint)
    if not directory.is_dir():
        raise BadFile(directory, f"is a file, not an SAE directory (with {CFG_FILE} and {WEIGHTS_FILE})", hint)
    steps = sorted((p for p in (directory / "checkpoints").glob("step_*") if (p / WEIGHTS_FILE).is_file()),
                   key=lambda p: int(p.name[5:]) if p.name[5:].isdigit() else -1)
    for name in (CFG_FILE, WEIGHTS_FILE):
        if not (directory / name).exists():
            if steps:  # a training run that has not finished (or was killed): its checkpoints hold SAEs
                raise MissingFile(directory / name, "does not exist: the run has not finished", f"complete it with "
                                  f"`aosae train --resume {directory}`, or use a checkpoint's SAE ({steps[-1]})")
            raise MissingFile(directory / name, "does not exist, so this is not a saved SAE", hint if name == CFG_FILE
                              and not (directory / WEIGHTS_FILE).exists() else FIX)
    return directory


def read_sae_files(directory: str | os.PathLike, fix: str = FIX):
    """(SAEConfig, weights) of a saved SAE directory, every file checked."""
    directory = check_sae_dir(directory)
    cfg = read_sae_config(directory, fix)
    return cfg, read_sae_weights(directory, cfg, fix)
