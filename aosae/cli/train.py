"""`aosae train`: every TrainConfig field is an option (tyro reads their docstrings)."""
from __future__ import annotations

from typing import Annotated, Optional

import tyro

from aosae.training.config import TrainConfig


def format_summary(run_dir, s: dict, seconds: float) -> str:
    rows = [
        ("MSE (raw activations)", f"{s['mse']:.4g}"),
        ("cosine similarity", f"{s['cossim']:.4f}"),
        ("explained variance", f"{s['explained_variance']:.4f}"),
        ("L0 (active latents/token)", f"{s['l0']:.1f}"),
        ("dead latents", f"{s['dead_latents']} / {s['d_sae']}"),
        ("final tau", f"{s['final_tau']:.4g}" + (f"  (target {s['tau_target']:.4g})" if s.get("tau_target") else "")),
        ("steps", str(s["steps"])),
        ("held-out tokens", f"{s['n_tokens']} (the last collected; `aosae eval` uses the same text)"),
        ("wall time", f"{seconds:.0f} s"),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"run: {run_dir}", "-" * (width + 20)] + [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


def train(
    cfg: Annotated[TrainConfig, tyro.conf.arg(name="")],
    resume: Optional[str] = None,
    progress: bool = True,
) -> int:
    """Train an SAE with the adaptive orthogonality penalty on one layer of a causal LM.

    With no options: SmolLM2-135M (offline) at layer 6 over the standard-library corpus, on
    CPU in a few minutes. Paper scale (GPU, hub access): --model google/gemma-2-2b --layer 19
    --dataset monology/pile-uncopyrighted --tokens 10_000_000 --d-sae 16384. Under
    `torchrun --nproc_per_node N -m aosae train ...` it runs data-parallel.

    Args:
        resume: A run directory: continue it from its latest checkpoint with its own settings
            (train_config.json). Only --steps may be given with it: it trains the run on to that many
            steps in all (e.g. --steps 2000 continues a finished 400-step run); it cannot be fewer than
            the steps done. Any other option is refused (the run's settings cannot change mid-run).
        progress: Show progress bars.
    """
    import time
    from pathlib import Path

    from aosae.cli.checks import (check_lm_packages, check_lm_settings, check_log_backend, check_new_run_dir,
                                  check_resume_run, check_writable_dir, drop_partial_line, partial_last_line)
    from aosae.files import BadFile
    from aosae.training import distributed as ddp
    from aosae.training.trainer import Trainer

    start = time.perf_counter()
    if resume:  # every file of the run is checked before the LM or the activations are touched
        from dataclasses import fields

        from aosae.cli import given_options

        run_cfg = check_resume_run(resume)
        changed = [name for name in given_options([f.name for f in fields(TrainConfig)]) if name != "steps"]
        if changed:
            options = ", ".join("--" + name.replace("_", "-") for name in changed)
            raise ValueError(f"{options} cannot be given with --resume: the run keeps its own settings "
                             f"({Path(resume) / 'train_config.json'}); drop {options} (only --steps may be given, "
                             "to train the run further), or start a new run with a different --out")
        steps = cfg.steps if given_options(["steps"]) else None
        check_log_backend(run_cfg.log)
        check_lm_packages("train", run_cfg.dataset, given=False)
        check_lm_settings(run_cfg.model, run_cfg.layer, run_cfg.context, source=Path(resume) / "train_config.json")
        cut = partial_last_line(Path(resume) / "metrics.jsonl")
        try:
            trainer = Trainer.resume(resume, progress=progress, steps=steps)
        except ValueError as err:  # a setting the run's own file gave: say where it came from
            if isinstance(err, BadFile) or str(resume) in str(err):
                raise
            raise ValueError(f"{err} (resuming with the settings in {Path(resume) / 'train_config.json'})") from err
        if cut is not None:  # the checkpoint loaded: now repair what the killed run left
            drop_partial_line(Path(resume) / "metrics.jsonl", cut)
    else:
        if cfg.warmup_steps is not None and cfg.warmup_steps > cfg.steps:  # refused: lr would never reach --lr
            raise ValueError(f"--warmup-steps {cfg.warmup_steps} is more than --steps {cfg.steps}: the learning rate "
                             f"would never reach --lr; pass --warmup-steps {cfg.steps} or less (or leave it out: "
                             "10% of the steps)")
        check_log_backend(cfg.log)
        check_lm_packages("train", cfg.dataset)
        check_new_run_dir(cfg.out)
        check_writable_dir(cfg.cache_dir, "--cache-dir")
        check_lm_settings(cfg.model, cfg.layer, cfg.context)
        if cfg.tau_budget_run is not None:  # read before the activations are collected
            from aosae.nn.tau import budget_from_run

            budget_from_run(cfg.tau_budget_run, cfg.tau_slack, 1.0)
        trainer = Trainer(cfg, progress=progress)
    try:
        summary = trainer.run()
    finally:  # also on a diverged run: a process group left alive can abort the exit (SIGABRT)
        ddp.shutdown(trainer.info)
    if trainer.info.is_main:
        print(format_summary(trainer.run_dir, summary, time.perf_counter() - start))
    return 0
