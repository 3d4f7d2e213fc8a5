"""`aosae ablate --out DIR`: the penalty ablation, every arm through the trainer's own loop.

Sweeps λ (ReLU) or k (TopK) for each arm over several seeds, on the project's synthetic
ground truth, SAELens's synthetic generator and optionally cached model activations, and
writes DIR/runs.json (every run; the sweeps of earlier calls into DIR that this call does not
redo are kept, and so are the other arms of a sweep redone with the same settings), DIR/ablation.json (L0-matched comparison with confidence
intervals), DIR/README.md (tables and verdict) and PNG plots. See aosae.experiments.ablation.

A sweep DIR/runs.json already holds with the same settings but other values (λ or k) is extended, not
retrained: its recorded (value, seed) groups with every requested arm are reused, only the missing
groups train, and the record keeps the union of the values (--no-reuse retrains instead).
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Optional

import torch
import tyro

from aosae.cli.checks import check_output_dir, require_package
from aosae.experiments.ablation import ARMS, Sweep, load_dataset, parse_arms, run_sweep
from aosae.experiments.ablation.datasets import model_held_out
from aosae.experiments.ablation.plots import missing as missing_plots
from aosae.experiments.ablation.record import complete_groups, read_record, settings_differ

SWEEPS = ("synthetic", "saelens", "synthetic_topk", "model")


@dataclass
class AblateArgs:
    """Train the penalty ablation (arms × swept λ or k × seeds) and write tables, JSON and plots to --out."""

    out: str = "benchmarks/results/ablation"
    """Output folder (created)."""
    sweeps: str = "synthetic,saelens,synthetic_topk"
    """Comma-separated subset of: synthetic (ReLU, λ sweep), saelens (ReLU, λ sweep on SAELens's generator),
    synthetic_topk (TopK, k sweep), model (ReLU on cached SmolLM2 activations, no ground truth)."""
    arms: str = ",".join(ARMS)
    """Comma-separated subset of the arms (the penalty-free arm 'none' always runs: it sets the budgets)."""
    seeds: int = 3
    """Seeds per (arm, λ or k)."""
    lambdas: str = "0.1,0.2,0.4"
    """λ values of the ReLU sweeps."""
    ks: str = "3,6,12"
    """k values of the TopK sweep."""
    steps: int = 800
    """Optimiser steps per run."""
    batch_size: int = 512
    lr: float = 5e-3
    d_sae: int = 128
    """Latents (synthetic sweeps)."""
    slack: float = 0.05
    """Budgeted arms: FVU at most (1 + slack) × the penalty-free run's at every step."""
    d: int = 64
    """Synthetic: dimension."""
    features: int = 128
    """Synthetic: number of true features."""
    samples: int = 40_000
    """Synthetic: training tokens."""
    model_tokens: int = 30_000
    """Model sweep: activation tokens (collected once, then read from the trainer's activation cache)."""
    model_arms: str = "none,paper,paper_budget,coact_x_decoder"
    """Model sweep: its arms (d_sae = 576 runs cost more than the synthetic ones)."""
    model_seeds: int = 2
    """Model sweep: seeds per (arm, λ)."""
    model_steps: int = 400
    """Model sweep: optimiser steps per run."""
    lm_tokens: int = 512
    """Model sweep: tokens of the KL/CE-loss scores (the LM runs three times over them per run)."""
    model_lambdas: str = "0.02,0.04,0.08"
    """Model sweep: λ values."""
    model_d_sae: Optional[int] = None
    """Model sweep: latents (default: the model's width, 576 on SmolLM2-135M)."""
    model_probing: bool = True
    """Model sweep: SAEBench's sparse probing and SCR/TPP of every run (about a minute per run on 2 cores
    after a one-time LM pass over the task texts, cached on disk)."""
    probing_tasks: str = "offline"
    """Model sweep: the task set of --model-probing (`offline`, `saebench` or a local folder; see `aosae eval --help`)."""
    probing_seeds: str = "42,43"
    """Model sweep: probe seeds of --model-probing (each redraws the negatives and retrains every probe)."""
    threads: int = 1
    """torch CPU threads (the SAEs are small: extra threads only contend on a shared machine)."""
    reuse: bool = True
    """Extend a sweep --out/runs.json holds with the same settings (every option but the value list): its
    recorded (value, seed) groups are reused, only the missing ones train. --no-reuse retrains them."""
    render_only: bool = False
    """Re-render the tables and plots from --out/runs.json without training."""


def _floats(text: str, name: str) -> tuple:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise ValueError(f"--{name} must be comma-separated numbers, got {text!r}") from err
    if not values:
        raise ValueError(f"--{name} is empty")
    return values


def ablate(args: Annotated[AblateArgs, tyro.conf.arg(name="")]) -> int:
    """Train the penalty ablation arms and write tables, JSON and PNG plots."""
    out = Path(args.out)
    runs_path = out / "runs.json"
    if args.render_only:
        from aosae.experiments.ablation.report import write_report

        if not runs_path.is_file():
            raise FileNotFoundError(f"{runs_path} does not exist: run `aosae ablate --out {out}` without --render-only first")
        write_report(read_record(runs_path, render_only=True), out)
        print(f"wrote {out / 'README.md'}")
        return 0
    # every option checked before any work (a bad one would otherwise stop a later sweep, after the first trained)
    for name in ("threads", "seeds", "model_seeds", "steps", "model_steps", "batch_size", "d_sae", "d", "features",
                 "samples", "model_tokens", "lm_tokens"):
        value = getattr(args, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be an int >= 1, got {value!r}")
    if not (math.isfinite(args.lr) and args.lr > 0) or not (math.isfinite(args.slack) and args.slack >= 0):
        raise ValueError(f"--lr must be > 0 and --slack >= 0, got --lr {args.lr} --slack {args.slack}")
    check_output_dir(out)
    sweeps = tuple(s.strip() for s in args.sweeps.split(",") if s.strip())
    bad = [s for s in sweeps if s not in SWEEPS]
    if bad or not sweeps:
        raise ValueError(f"unknown or no sweep(s) {bad}; choose from {', '.join(SWEEPS)}")
    arms = parse_arms(args.arms)
    lambdas, ks = _floats(args.lambdas, "lambdas"), tuple(int(k) for k in _floats(args.ks, "ks"))
    if min(lambdas) < 0 or min(ks) < 1 or any(k != float(v) for k, v in zip(ks, _floats(args.ks, "ks"))):
        raise ValueError(f"--lambdas must be >= 0 and --ks ints >= 1, got --lambdas {args.lambdas} --ks {args.ks}")
    if any(s != "model" for s in sweeps) and args.batch_size > args.samples:
        raise ValueError(f"--batch-size {args.batch_size} is larger than --samples {args.samples} (the synthetic "
                         "sweeps' training tokens): lower --batch-size or raise --samples")
    if "model" in sweeps and args.batch_size > args.model_tokens - model_held_out(args.model_tokens):
        raise ValueError(f"--batch-size {args.batch_size} is larger than the model sweep's training tokens "
                         f"({args.model_tokens - model_held_out(args.model_tokens)} of --model-tokens {args.model_tokens} "
                         "after the held-out part): lower --batch-size or raise --model-tokens")
    if "synthetic_topk" in sweeps and max(ks) > args.d_sae:
        raise ValueError(f"--ks {args.ks} exceeds --d-sae {args.d_sae}: a TopK SAE keeps at most d_sae latents")
    if "model" in sweeps:
        if min(_floats(args.model_lambdas, "model-lambdas")) < 0:
            raise ValueError(f"--model-lambdas must be >= 0, got {args.model_lambdas}")
        parse_arms(args.model_arms)
        if args.model_d_sae is not None and (isinstance(args.model_d_sae, bool) or args.model_d_sae < 1):
            raise ValueError(f"--model-d-sae must be an int >= 1, got {args.model_d_sae!r}")
        if args.model_probing:
            probing_seeds = tuple(int(v) for v in _floats(args.probing_seeds, "probing-seeds"))
            require_package("sklearn", "--model-probing (SAEBench's top-k probes)",
                            "pip install scikit-learn (or aosae[eval]), or pass --no-model-probing")
            if len(probing_seeds) > 1:
                require_package("scipy", "--model-probing over several seeds (their 95% intervals)",
                                "pip install scipy (or aosae[eval]), or pass one --probing-seeds")
            from aosae.eval.tasks import load_task_set

            load_task_set(args.probing_tasks)  # a bad task set fails now, not after the first sweeps trained
    # before any training: what the sweeps and the report need, and the record they add to
    if "saelens" in sweeps:
        require_package("sae_lens", "--sweeps saelens (SAELens's synthetic generator)",
                        "pip install 'sae-lens>=6', or drop saelens from --sweeps")
    if missing_plots() is not None:
        warnings.warn(f"{missing_plots()}: the tables and JSON will be written, the PNG plots skipped "
                      f"(install it later and run `aosae ablate --out {out} --render-only`)", stacklevel=2)
    earlier = read_record(runs_path, render_only=False)["sweeps"] if runs_path.exists() else {}
    out.mkdir(parents=True, exist_ok=True)
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    record = {"args": asdict(args), "arms": {a: asdict(ARMS[a]) for a in ARMS}, "sweeps": {}}
    record["sweeps"] = {k: v for k, v in earlier.items() if k not in sweeps}  # sweeps this call does not redo
    try:
        for name in sweeps:
            kind = {"synthetic_topk": "synthetic"}.get(name, name)
            t0 = time.perf_counter()
            train, held, truth, desc, scorer = load_dataset(
                kind, samples=args.samples, d=args.d, features=args.features, tokens=args.model_tokens,
                lm_tokens=args.lm_tokens, probing=args.model_probing, probing_tasks=args.probing_tasks,
                probing_seeds=tuple(int(v) for v in _floats(args.probing_seeds, "probing-seeds")))
            base = dict(steps=args.steps if kind != "model" else args.model_steps, batch_size=args.batch_size, tokens=train.shape[0], lr=args.lr,
                        checkpoint_every=10**9, device="cpu")
            if kind != "model":
                base["d_sae"] = args.d_sae
            elif args.model_d_sae is not None:
                base["d_sae"] = args.model_d_sae
            values = lambdas if kind != "model" else _floats(args.model_lambdas, "model-lambdas")
            sweep_arms = arms if kind != "model" else parse_arms(args.model_arms)
            seeds = args.seeds if kind != "model" else args.model_seeds
            if name.endswith("_topk"):
                base.update(activation="topk", l1=0.0)
                values = ks
            sweep = Sweep(name, base, values, seeds=tuple(range(seeds)), slack=args.slack)
            print(f"{name}: {desc['data']}; {len(sweep_arms)} arms × {len(values)} {sweep.swept} × {seeds} seeds")
            old = earlier.get(name)
            sweep_args, reuse = asdict(args), {}
            differ = None if old is None else settings_differ(old, {
                "name": name, "base": base, "slack": args.slack, "swept": sweep.swept, "description": desc, "args": sweep_args})
            extend = old is not None and args.reuse and not differ
            if extend:  # the union of the values; every recorded group with each arm of this call is reused
                values = tuple(values) + tuple(v for v in old["values"] if v not in values)
                sweep = Sweep(name, base, values, seeds=sweep.seeds, slack=args.slack)
                reuse = {key: runs for key, runs in complete_groups(old, sweep_arms).items()
                         if key[0] in values and key[1] in sweep.seeds}
                value_option = "model_lambdas" if kind == "model" else "ks" if sweep.swept == "top_k" else "lambdas"
                sweep_args[value_option] = ",".join(str(v) for v in sorted(values))  # the record's command reruns it all
                print(f"{name}: extending the sweep recorded in {runs_path}: reusing {len(reuse)} of "
                      f"{len(values) * len(sweep.seeds)} ({sweep.swept}, seed) groups "
                      f"({', '.join(f'{v}/{s}' for v, s in reuse) or 'none'}), training the other "
                      f"{len(values) * len(sweep.seeds) - len(reuse)}"
                      + (" (nothing to train; --no-reuse retrains them)" if len(reuse) == len(values) * len(sweep.seeds) else ""))
            same_settings = old is not None and (old["base"], old["values"]) == (base, list(values))
            if old is not None and not extend and not same_settings:
                why = f"other settings ({', '.join(differ)})" if differ else "--no-reuse and other values"
                warnings.warn(f"{runs_path} holds a {name} sweep run with {why} ({len(old['runs'])} runs): it "
                              "stays there until this call's sweep completes, then this one replaces it; stop now and "
                              "pass another --out to keep both", stacklevel=2)

            def save(rows, complete: bool, name=name, sweep=sweep, sweep_arms=sweep_arms, old=old, same=same_settings,
                     desc=desc, truth=truth, base=base, values=values, t0=t0, extend=extend, sweep_args=sweep_args):
                arms_run, seconds = sweep_arms, time.perf_counter() - t0
                if extend or same:  # the recorded arms first, then this call's new ones
                    recorded = old["arms"] if isinstance(old.get("arms"), list) else [r["arm"] for r in old["runs"]]
                    arms_run = tuple(dict.fromkeys([*recorded, *sweep_arms]))
                if extend:  # every recorded run stays unless this call retrained it (so a partial save loses nothing)
                    merged = {(r["value"], r["seed"], r["arm"]): r for r in old["runs"]}
                    merged.update({(r["value"], r["seed"], r["arm"]): r for r in rows})
                    order = sorted(values)
                    rows = sorted(merged.values(), key=lambda r: (order.index(r["value"]), r["seed"],
                                                                  arms_run.index(r["arm"]) if r["arm"] in arms_run else len(arms_run)))
                    earlier_seconds = old.get("seconds")  # not checked by read_record: the report does not read it
                    values = order
                    seconds += earlier_seconds if isinstance(earlier_seconds, (int, float)) else 0.0
                elif same:  # the same sweep settings: keep the earlier call's arms that this one did not train
                    rows = [r for r in old["runs"] if r["arm"] not in sweep_arms] + rows
                record["sweeps"][name] = {"args": sweep_args, "arms": list(arms_run), "description": desc,
                                          "swept": sweep.swept, "values": list(values), "base": base, "slack": args.slack,
                                          "ground_truth": truth is not None, "seconds": seconds,
                                          "complete": complete, "runs": list(rows)}
                if not complete and old is not None and not extend:
                    return  # an earlier record of this sweep stays on disk until this one is complete
                tmp = runs_path.with_name(runs_path.name + ".tmp")  # atomically: a crash keeps what ran
                tmp.write_text(json.dumps(record, indent=1))
                os.replace(tmp, runs_path)

            rows = run_sweep(sweep, train, held, truth, sweep_arms, scorer=scorer, reuse=reuse,
                             on_run=lambda rows: save(rows, complete=False))
            save(rows, complete=True)
    finally:
        torch.set_num_threads(previous)
    from aosae.experiments.ablation.report import write_report

    write_report(record, out)
    print(f"wrote {runs_path} and {out / 'README.md'}")
    return 0
