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
from safetensors.torch import save_file

from aosae.files import (BadFile, check_file_digests, file_sha256, fsync_path, load_tensors, read_json,
                         write_dir_atomically, write_json)
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


class Unreadable(ValueError):
    """One file of a checkpoint cannot be used: str = "<file name> <what is wrong with it>", in our words."""

    def __init__(self, name: str, problem: str):
        self.name, self.problem = name, problem
        super().__init__(f"{name} {problem}")


def check_state(d: Path, state) -> None:
    """state.json's own values, before any is applied: an edited or damaged one would otherwise resume
    at the wrong step (misaligned with metrics.jsonl and the batches) or with a broken activation scale."""
    for key in ("step", "scale", "tau", "rng", "ortho_kth", "sha256"):
        if key not in state:
            raise Unreadable("state.json", f"has no {key!r}")
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or f"step_{step}" != d.name:
        raise Unreadable("state.json", f"says step {step!r}, but its directory is {d.name} (edited or damaged)")
    scale = state["scale"]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise Unreadable("state.json", f"has activation scale {scale!r}: it must be a positive finite number")
    digests = state["sha256"]
    missing = [name for name in CHECKPOINT_FILES if not isinstance(digests, dict) or name not in digests]
    if missing:  # without them a damaged optimizer.pt or rng file would load silently
        raise Unreadable("state.json", f"records no checksum for {', '.join(missing)}, so they cannot be verified")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_state_values(state: dict, tau) -> None:
    """state.json's τ, RNG and top-k threshold, tried on scratch copies: an edited or damaged value would
    otherwise fail half-way through applying the checkpoint (a KeyError, a TypeError at the next step)."""
    import copy

    try:
        probe = copy.deepcopy(tau)
        probe.load_state_dict(state["tau"])
        values = [x for k, v in probe.state_dict().items() if k != "rule" for x in (v if isinstance(v, list) else [v])]
        ok = all(x is None or _finite(x) for x in values) and _finite(probe.tau)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        detail = (f"it has no {err.args[0]!r}" if isinstance(err, KeyError) and err.args else
                  str(err).splitlines()[0][:80] if isinstance(err, ValueError) and str(err) else "a value of the wrong type")
        raise Unreadable("state.json", f"has a 'tau' state that cannot be restored ({detail})") from err
    if not ok:
        raise Unreadable("state.json", "has a 'tau' state with a value that is not a finite number")
    try:
        n, p = state["rng"]["numpy"], state["rng"]["python"]
        np.random.RandomState().set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
        random.Random().setstate((p[0], tuple(p[1]), p[2]))
    except (KeyError, TypeError, ValueError, IndexError, OverflowError) as err:
        raise Unreadable("state.json", "has an 'rng' state that cannot be restored (edited or damaged)") from err
    if state["ortho_kth"] is not None and not _finite(state["ortho_kth"]):
        raise Unreadable("state.json", f"has 'ortho_kth' {state['ortho_kth']!r}: it must be a finite number or null")


def read_checkpoint(d: Path, sae: SparseAutoencoder, device, tau=None) -> dict:
    """Everything in checkpoint `d`, read and checked before any of it is applied; Unreadable (a
    ValueError naming the file and what is wrong, in a few words) if not. `tau`: the run's τ rule,
    whose state is tried on a copy."""
    try:
        state = read_json(d / "state.json", "")
        check_state(d, state)
        check_file_digests(d, state["sha256"], "")  # a flipped byte in optimizer.pt loads silently otherwise
    except BadFile as err:  # our own words: cut short, not JSON, checksum mismatch, missing
        raise Unreadable(err.path.name, err.problem) from err
    if tau is not None:
        check_state_values(state, tau)
    try:  # the checksums matched: what follows fails only for a checkpoint written by another version
        weights, rng = load_tensors(d / "train_weights.safetensors", ""), load_tensors(d / "rng.safetensors", "")
    except BadFile as err:
        raise Unreadable(err.path.name, err.problem) from err
    name = "train_weights.safetensors"
    for key in WEIGHT_KEYS:
        want = tuple(getattr(sae, key).shape)
        if key not in weights or tuple(weights[key].shape) != want:
            raise Unreadable(name, f"has no {key} of shape {want} (a checkpoint of another SAE?)")
        if not bool(torch.isfinite(weights[key]).all()):
            raise Unreadable(name, f"holds NaN/Inf in {key}")
    try:
        opt = torch.load(d / "optimizer.pt", weights_only=True, map_location=device)
    except Exception as err:  # torch raises its own types (zip reader, unpickler): keep their detail short
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0][:60]
        raise Unreadable("optimizer.pt", f"is not an optimizer state saved by torch (damaged?; {detail})") from err
    if not isinstance(opt, dict) or "optimizer" not in opt or "scheduler" not in opt:
        raise Unreadable("optimizer.pt", "lacks the optimizer or scheduler state")
    if not isinstance(rng.get("torch_cpu"), torch.Tensor) or rng["torch_cpu"].dtype != torch.uint8:
        raise Unreadable("rng.safetensors", "has no torch_cpu generator state (uint8)")
    try:
        torch.Generator().set_state(rng["torch_cpu"])
    except (RuntimeError, TypeError) as err:
        raise Unreadable("rng.safetensors", "holds a torch_cpu generator state that cannot be restored") from err
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
    for p in sorted((Path(trainer.run_dir) / "checkpoints").glob("step_*")):
        if p.name[len("step_"):].isdigit() and not p.is_dir():  # else passed over without a word
            warnings.warn(f"skipping checkpoint {p}: it is a file, not a checkpoint directory; trying the ones "
                          "that are directories", CheckpointWarning, stacklevel=2)
    for d in list_checkpoints(trainer.run_dir):
        try:
            ckpt = read_checkpoint(d, trainer.sae, trainer.device, trainer.tau)
        except Unreadable as err:
            tried.append(f"{d / err.name} {err.problem}")
            warnings.warn(f"skipping checkpoint {d}: its {err.name} {err.problem}; trying the one before",
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
