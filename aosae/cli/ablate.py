"""`aosae ablate --out DIR [--data synthetic|model|both] [--steps N]`: the penalty ablation.

Trains, at equal steps and matched settings, no penalty / fixed τ 0.05 / fixed τ 0.2 /
adaptive τ / the same penalty on decoder directions, and writes a markdown table and PNG
plots to DIR (see aosae.ablation).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Optional

import torch
import tyro

from aosae.eval import ablation as A
from aosae.data import synthetic as S


@dataclass
class AblateArgs:
    """Train the penalty ablation arms and write a markdown table and PNG plots to --out."""

    out: str
    """Output folder (created)."""
    data: Literal["synthetic", "model", "both"] = "synthetic"
    """Synthetic ground truth, the embedded default model's cached activations, or both."""
    steps: int = 3000
    """Optimiser steps per arm."""
    seeds: int = 1
    """Seeds per arm; the table shows mean ± std."""
    arms: str = ",".join(A.ARMS)
    """Comma-separated subset of the arms."""
    batch_size: int = 512
    lr: float = 3e-3
    l1: Optional[float] = None
    """λ of the L1 term (default 0.2 on synthetic data; 1.5 on model data, scaled to E‖x‖ = √d_in: L0 ≈ 40 on SmolLM2 layer 6)."""
    coactivation: Literal["sum", "mean"] = "mean"
    """C = fᵀf / B, the batch mean (as `aosae train`), or the paper's literal sum over the batch."""
    similarity: Literal["dot", "cosine"] = "dot"
    threads: int = 1
    """torch CPU threads (the SAEs are small: extra threads only contend on a shared machine)."""
    d: int = 64
    """Synthetic: dimension."""
    features: int = 128
    """Synthetic: number of true features."""
    d_sae: Optional[int] = None
    """Latents (default: --features on synthetic, 2·d_in on model)."""
    firing_prob: float = 0.03
    correlation: float = 0.3
    samples: int = 40000
    """Synthetic: training tokens."""
    model: Optional[str] = None
    """Model for --data model (default: the embedded SmolLM2-135M)."""
    layer: Optional[int] = None
    """Hooked decoder block (default: the trainer's default)."""
    tokens: int = 60000
    """Model: activation tokens to cache (train + eval)."""


def ablate(args: Annotated[AblateArgs, tyro.conf.arg(name="")]) -> int:
    """Train the penalty ablation arms and write a markdown table and PNG plots."""
    if args.threads < 1:
        raise ValueError("--threads must be >= 1")
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(previous)


def _synthetic(args, log):
    scfg = S.SyntheticConfig(d=args.d, n_features=args.features, firing_prob=args.firing_prob,
                             correlation=args.correlation)
    train = S.generate(scfg, args.samples, seed=0)
    held = S.generate(scfg, max(2000, args.samples // 5), seed=1)
    cfg = A.AblationConfig(steps=args.steps, batch_size=args.batch_size, d_sae=args.d_sae or args.features,
                           lr=args.lr, l1_coeff=0.2 if args.l1 is None else args.l1,
                           similarity=args.similarity, coactivation=args.coactivation,
                           log_every=max(1, args.steps // 60))
    meta = {"data": f"synthetic: d={scfg.d}, {scfg.n_features} features ({scfg.n_hierarchy} in a hierarchy of "
                    f"{scfg.n_parents} parents × {scfg.children_per_parent} children), firing prob {scfg.firing_prob}, "
                    f"correlation {scfg.correlation} in groups of {scfg.correlation_group}, {scfg.magnitude} magnitudes; "
                    f"{args.samples} train / {held.x.shape[0]} held-out tokens",
            "true L0 (held-out)": f"{float((held.activations > 0).sum(1).double().mean()):.2f}"}
    log(f"synthetic: {meta['data']}")
    return train.x, held.x, held, cfg, meta


def _model(args, log):
    x, meta = A.model_activations(args.model, args.layer, args.tokens, log=log)
    # as `aosae train`: scale so that E‖x‖ = √d_in, which gives λ the same meaning on any model
    scale = x.shape[1] ** 0.5 / float(x.norm(dim=1).mean())
    x = x * scale
    n_eval = max(1000, x.shape[0] // 6)
    x_train, x_eval = x[:-n_eval], x[-n_eval:]  # held out: the last tokens collected
    cfg = A.AblationConfig(steps=args.steps, batch_size=args.batch_size, d_sae=args.d_sae or 2 * x.shape[1],
                           lr=args.lr, l1_coeff=1.5 if args.l1 is None else args.l1, similarity=args.similarity,
                           coactivation=args.coactivation, log_every=max(1, args.steps // 60))
    meta.update({"train / held-out tokens": f"{x_train.shape[0]} / {x_eval.shape[0]}",
                 "activation scale": f"{scale:.4g} (E‖x‖ = √d_in, as aosae train)"})
    return x_train, x_eval, None, cfg, meta


def _run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arms = tuple(a.strip() for a in args.arms.split(",") if a.strip())
    bad = [a for a in arms if a not in A.ARMS]
    if bad:
        raise ValueError(f"unknown arm(s) {bad}; choose from {', '.join(A.ARMS)}")
    kinds = ("synthetic", "model") if args.data == "both" else (args.data,)
    for kind in kinds:
        t0 = time.perf_counter()
        x_train, x_eval, truth, cfg, meta = (_synthetic if kind == "synthetic" else _model)(args, print)
        print(f"{kind}: {len(arms)} arms × {args.seeds} seed(s) × {cfg.steps} steps")
        results = A.run_ablation(x_train, x_eval, cfg, truth=truth, arms=arms, seeds=tuple(range(args.seeds)))
        meta["wall time"] = f"{time.perf_counter() - t0:.0f} s on {torch.get_num_threads()} threads"
        md = A.write_outputs(results, out, kind, cfg, meta)
        print(A.markdown_table(results))
        print(f"wrote {md}")
    index = out / "README.md"
    listed = sorted(p.name for p in out.glob("*.md") if p.name != "README.md")  # earlier runs into DIR too
    index.write_text("# aosae ablation\n\n" + "\n".join(f"- [{d}]({d})" for d in listed) + "\n")
    return 0
