"""Checkpoints of a training run: write (atomically), prune, and load with a fallback.

checkpoints/step_<N>/ holds the loadable SAE at raw activation scale (cfg.json +
sae_weights.safetensors), the training weights (train_weights.safetensors), the optimiser and
scheduler (optimizer.pt), the RNG states (rng.safetensors) and state.json (step, scale, τ,
data position). The data position is derived from the step, so it is only recorded.

Kept: the newest `keep` checkpoints plus the final one (step = --steps). A resume tries the
newest first; a checkpoint that cannot be read completely (truncated or missing file, bad
JSON, wrong shapes) is skipped with a CheckpointWarning naming it, and the next older one is
used. If checkpoints exist but none is usable: NoUsableCheckpoint, a one-line error.
"""
from __future__ import annotations

import json
import math
import random
import shutil
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from aosae.files import check_file_digests, file_sha256, fsync_path, write_dir_atomically, write_json
from aosae.nn.sae import WEIGHT_KEYS, SAEConfig, SparseAutoencoder


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped because it could not be read."""


class NoUsableCheckpoint(RuntimeError):
    """Every checkpoint of the run is damaged."""


def folded_sae(sae: SparseAutoencoder, scale: float) -> SparseAutoencoder:
    """The same SAE for raw activations x, when it was trained on x·s.

    relu((x·s − b_dec)W_enc + b_enc)/s = relu((x − b_dec/s)W_enc + b_enc/s), so with b_enc/s and b_dec/s
    the latents are f/s and the reconstruction is x̂/s; W_enc and W_dec (unit-norm rows) are unchanged."""
    out = SparseAutoencoder(SAEConfig(**{**sae.cfg.__dict__, "extra": {**sae.cfg.extra, "activation_scale": scale}}))
    with torch.no_grad():
        out.W_enc.copy_(sae.W_enc)
        out.W_dec.copy_(sae.W_dec)
        out.b_enc.copy_(sae.b_enc / scale)
        out.b_dec.copy_(sae.b_dec / scale)
        if sae.cfg.activation == "batchtopk":  # a threshold on pre-activations, which the fold divides by scale
            out.threshold.copy_(sae.threshold / scale if float(sae.threshold) >= 0 else sae.threshold)
    return out


def rng_state() -> tuple[dict, dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    np_state = np.random.get_state()
    py_state = random.getstate()
    plain = {
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    return tensors, plain


def set_rng_state(tensors: dict, plain: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    n = plain["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = plain["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """step_<N> directories, newest first (temp and .old leftovers of a crash are not listed)."""
    found = []
    for p in (Path(run_dir) / "checkpoints").glob("step_*"):
        tail = p.name[len("step_"):]
        if p.is_dir() and tail.isdigit():
            found.append((int(tail), p))
    return [p for _, p in sorted(found, reverse=True)]


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest checkpoint with a state.json (not validated further)."""
    return next((p for p in list_checkpoints(run_dir) if (p / "state.json").is_file()), None)


def write_checkpoint(trainer) -> Path:
    """Atomically write checkpoints/step_<trainer.step>: filled in a temp dir, fsync'd, renamed."""

    def fill(d: Path) -> None:
        folded_sae(trainer.sae, trainer.scale).write_files(d)  # loadable SAE (raw activation scale)
        save_file(trainer.sae.state_tensors(), str(d / "train_weights.safetensors"))
        fsync_path(d / "train_weights.safetensors")
        torch.save({"optimizer": trainer.opt.state_dict(), "scheduler": trainer.sched.state_dict()}, d / "optimizer.pt")
        fsync_path(d / "optimizer.pt")
        rng_tensors, rng_plain = rng_state()
        save_file(rng_tensors, str(d / "rng.safetensors"))
        epoch, group, index = trainer.buffer.position(trainer.step)
        kth = trainer.ortho._kth if trainer.ortho is not None else None
        write_json(d / "state.json", {"sha256": {name: file_sha256(d / name) for name in CHECKPOINT_FILES},  # checked on resume
            "step": trainer.step, "scale": trainer.scale, "tau": trainer.tau.state_dict(), "rng": rng_plain,
            "data_position": {"epoch": epoch, "group": group, "batch_in_group": index},
            "ortho_kth": None if kth is None else float(kth),
        })

    return write_dir_atomically(checkpoint_dir(trainer.run_dir, trainer.step), fill)


def prune_checkpoints(run_dir: Path, keep: int, final_step: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints besides the final one (step_<final_step>, kept too)."""
    others = [p for p in list_checkpoints(run_dir) if p.name != f"step_{final_step}"]
    for p in others[keep:]:
        shutil.rmtree(p, ignore_errors=True)
    return others[keep:]


CHECKPOINT_FILES = ("cfg.json", "sae_weights.safetensors", "train_weights.safetensors", "optimizer.pt", "rng.safetensors")


def check_state(d: Path, state) -> None:
    """state.json's own values, before any is applied: an edited or damaged one would otherwise resume
    at the wrong step (misaligned with metrics.jsonl and the batches) or with a broken activation scale."""
    where = d / "state.json"
    if not isinstance(state, dict):
        raise ValueError(f"{where} holds a JSON {type(state).__name__}, not an object")
    for key in ("step", "scale", "tau", "rng", "ortho_kth", "sha256"):
        if key not in state:
            raise ValueError(f"{where} has no {key!r}")
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or f"step_{step}" != d.name:
        raise ValueError(f"{where} says step {step!r}, but its directory is {d.name} (edited or damaged)")
    scale = state["scale"]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{where} has activation scale {scale!r}: it must be a positive finite number")
    digests = state["sha256"]
    missing = [name for name in CHECKPOINT_FILES if not isinstance(digests, dict) or name not in digests]
    if missing:  # without them a damaged optimizer.pt or rng file would load silently
        raise ValueError(f"{where} records no checksum for {', '.join(missing)}, so they cannot be verified")


def read_checkpoint(d: Path, sae: SparseAutoencoder, device) -> dict:
    """Everything in checkpoint `d`, read and checked before any of it is applied (ValueError if not)."""
    try:
        state = json.loads((d / "state.json").read_text())
        check_state(d, state)
        check_file_digests(d, state["sha256"], "it is skipped")  # a flipped byte in optimizer.pt loads silently otherwise
        weights = load_file(str(d / "train_weights.safetensors"))
        for name in WEIGHT_KEYS:
            want = tuple(getattr(sae, name).shape)
            if name not in weights or tuple(weights[name].shape) != want:
                raise ValueError(f"train_weights.safetensors: {name} missing or not of shape {want}")
            if not bool(torch.isfinite(weights[name]).all()):
                raise ValueError(f"train_weights.safetensors: {name} is not finite")
        opt = torch.load(d / "optimizer.pt", weights_only=True, map_location=device)
        if "optimizer" not in opt or "scheduler" not in opt:
            raise ValueError("optimizer.pt lacks the optimizer or scheduler state")
        rng = load_file(str(d / "rng.safetensors"))
    except Exception as err:  # any failure to read means "not usable"; the caller names it
        raise ValueError(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
    return {"state": state, "weights": weights, "opt": opt, "rng": rng}


def apply_checkpoint(trainer, ckpt: dict) -> None:
    state = ckpt["state"]
    with torch.no_grad():
        for name in WEIGHT_KEYS:
            getattr(trainer.sae, name).copy_(ckpt["weights"][name])
    trainer.sae.load_extra_tensors_(ckpt["weights"], "train_weights.safetensors")  # BatchTopK's threshold
    trainer.opt.load_state_dict(ckpt["opt"]["optimizer"])
    trainer.sched.load_state_dict(ckpt["opt"]["scheduler"])
    trainer.tau.load_state_dict(state["tau"])
    trainer.scale = state["scale"]
    if trainer.ortho is not None and state["ortho_kth"] is not None:
        trainer.ortho._kth = torch.tensor(state["ortho_kth"], device=trainer.device)
    set_rng_state(ckpt["rng"], state["rng"])
    trainer.step = state["step"]


def load_latest_good(trainer) -> Optional[Path]:
    """Load the newest usable checkpoint into `trainer`; None if the run has none at all."""
    tried = []
    for d in list_checkpoints(trainer.run_dir):
        try:
            ckpt = read_checkpoint(d, trainer.sae, trainer.device)
        except ValueError as err:
            tried.append(f"{d.name} ({err})")
            warnings.warn(f"skipping checkpoint {d}: it cannot be read ({err}); trying the previous one",
                          CheckpointWarning, stacklevel=2)
            continue
        apply_checkpoint(trainer, ckpt)
        return d
    if tried:
        raise NoUsableCheckpoint(
            f"no usable checkpoint in {Path(trainer.run_dir) / 'checkpoints'}: " + "; ".join(tried)
            + ". Start a new run (a different --out), or restore a checkpoint from a backup."
        )
    return None
