"""What a resume checks in a run directory before anything is written: train_config.json agrees with
the checkpoints' cfg.json, the checkpoints were not deleted after the run trained, and metrics.jsonl
logs every step up to the checkpoint's, once and in order. Each failure is one BadFile naming the file."""
from __future__ import annotations

import json
from pathlib import Path

from aosae.data.language_models import DEFAULT_MODEL
from aosae.data.text import DEFAULT_DATASET
from aosae.files import BadFile, MissingFile
from aosae.nn.sae import SAEConfig
from aosae.training import checkpoints as ckpts
from aosae.training.config import TrainConfig


def logged_steps(path: Path) -> list[int]:
    """The steps metrics.jsonl logs, in file order; lines that are not a JSON row (a line cut by a kill,
    a blank one) are passed over."""
    steps = []
    for line in path.read_bytes().split(b"\n"):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            steps.append(row["step"])
    return steps


def check_config_fits_checkpoints(run_dir: Path, cfg: TrainConfig) -> None:
    """BadFile naming train_config.json when a setting that shapes the SAE (d_sae, activation, top_k)
    or its data (model, layer, context, dataset, tokens) differs from what the checkpoints' cfg.json
    records: train_config.json was edited after the run started. Found here, before the checkpoints
    are blamed for not loading (or a resume silently continues on other activations)."""
    for d in ckpts.list_checkpoints(run_dir):  # the newest readable one
        try:
            saved = SAEConfig.from_json_dict(json.loads((d / "cfg.json").read_text()))
        except (OSError, ValueError, TypeError):
            continue  # a damaged checkpoint: the loader skips it with a warning
        for key, want, have in config_mismatches(cfg, saved):
            raise BadFile(run_dir / "train_config.json",
                          f"{key!r} is {want!r} but the run's checkpoints were trained with {key}={have!r} "
                          f"({d / 'cfg.json'}): the file was edited after the run started",
                          f"set {key!r} back to {have!r} to resume, or start a new run with a different --out")
        return


def config_mismatches(cfg: TrainConfig, saved: SAEConfig) -> list[tuple[str, object, object]]:
    """(setting, train_config.json's value, the SAE's cfg.json value) for each setting that shapes the
    SAE or its data and differs: the two files of one run must agree."""
    extra = saved.extra or {}
    pairs = [("d_sae", cfg.d_sae or saved.d_in, saved.d_sae), ("activation", cfg.activation, saved.activation),
             ("top_k", cfg.top_k, saved.top_k), ("model", cfg.model or DEFAULT_MODEL, saved.model_name),
             ("layer", cfg.layer, saved.hook_layer), ("context", cfg.context, saved.context_size)]
    pairs += [(key, getattr(cfg, key) or default, extra[key])
              for key, default in (("dataset", DEFAULT_DATASET), ("tokens", None)) if key in extra]
    return [(key, want, have) for key, want, have in pairs
            if have is not None and want != have and not (key == "top_k" and cfg.activation == "relu")]


def check_checkpoints_kept(run_dir: Path) -> None:
    """A run with no checkpoint starts over on resume, which is right only for a run killed before its
    first one (step_0 is written before any step). If the run has trained (metrics.jsonl has steps, or
    its final files exist), its checkpoints were deleted: refused (MissingFile naming them), not a
    silent restart from step 0 that would overwrite its log and weights."""
    if ckpts.list_checkpoints(run_dir):
        return
    log = run_dir / "metrics.jsonl"
    steps = max(logged_steps(log), default=0) if log.is_file() else 0
    finals = [name for name in ("summary.json", "sae_weights.safetensors") if (run_dir / name).exists()]
    if steps or finals:
        done = f"metrics.jsonl logs {steps} steps" if steps else f"it has {' and '.join(finals)}"
        where = run_dir / "checkpoints"
        raise MissingFile(where, f"{'holds no checkpoint' if where.is_dir() else 'does not exist'}, but the run has "
                          f"trained ({done}): resuming would silently start it again from step 0",
                          "restore the checkpoints from a backup, or start afresh with `aosae train` and a new --out "
                          "(the activation store is reused)")


def check_log_covers(path: Path, step: int) -> None:
    """A resume from step N needs metrics.jsonl's rows 1..N: else the report and summary silently
    lose them. BadFile (MissingFile) naming the log, before anything is written."""
    if step == 0:
        return
    fix = (f"restore it from a backup, or start the run again with a new --out (the activation store is reused); "
           f"the run itself is untouched")
    if not path.is_file():
        raise MissingFile(path, f"does not exist, but the run resumes at step {step}: the log of steps 1-{step} is lost",
                          fix)
    order = logged_steps(path)
    steps = set(order)
    missing = [s for s in range(1, step + 1) if s not in steps]
    if missing:
        what = "is empty" if not steps else f"lacks {len(missing)} of the steps 1-{step} (first missing: {missing[0]})"
        raise BadFile(path, f"{what}, but the run resumes at step {step} (its checkpoint)", fix)
    kept = [s for s in order if s <= step]  # later rows are a killed run's, dropped by the resume
    if len(kept) != step or kept != sorted(kept):  # aosae logs each step once, in order: edited or two logs joined
        seen: set = set()
        twice = next((s for s in kept if s in seen or seen.add(s)), None)
        what = f"logs step {twice} more than once" if twice is not None else "has its steps out of order"
        raise BadFile(path, f"{what} (edited, or two logs joined?): the report would count those steps wrongly",
                      "keep one line per step, in order (or restore the file from a backup); the run itself is untouched")
