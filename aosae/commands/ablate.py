"""`aosae ablate --out DIR [--data synthetic|model|both] [--steps N]`: the penalty ablation.

Trains, at equal steps and matched settings, no penalty / fixed τ 0.05 / fixed τ 0.2 /
adaptive τ / the same penalty on decoder directions, and writes a markdown table and PNG
plots to DIR (see aosae.ablation).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from .. import ablation as A
from .. import synthetic as S


def register(sub) -> None:
    p = sub.add_parser("ablate", help="train the penalty ablation arms and write a table + plots",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--data", choices=("synthetic", "model", "both"), default="synthetic",
                   help="synthetic ground truth, the embedded default model's cached activations, or both")
    p.add_argument("--steps", type=int, default=3000, help="optimiser steps per arm (default 3000)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per arm; the table shows mean ± std (default 1)")
    p.add_argument("--arms", default=",".join(A.ARMS), help=f"comma-separated subset of {','.join(A.ARMS)}")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--l1", type=float, default=None,
                   help="λ of the L1 term (default 0.2 on synthetic data; on model data, where activations are "
                        "scaled to E‖x‖ = √d_in as in `aosae train`, 1.5: L0 ≈ 40 on SmolLM2 layer 6)")
    p.add_argument("--coactivation", choices=("sum", "mean"), default="mean",
                   help="C = fᵀf / B, the batch mean (default, as `aosae train`), or the paper's literal sum over the batch")
    p.add_argument("--similarity", choices=("dot", "cosine"), default="dot")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the SAEs are small, and extra threads only contend "
                        "with each other on a shared machine)")
    # synthetic data
    p.add_argument("--d", type=int, default=64, help="synthetic: dimension")
    p.add_argument("--features", type=int, default=128, help="synthetic: number of true features")
    p.add_argument("--d-sae", type=int, default=None, help="latents (default: --features on synthetic, 2·d_in on model)")
    p.add_argument("--firing-prob", type=float, default=0.03)
    p.add_argument("--correlation", type=float, default=0.3)
    p.add_argument("--samples", type=int, default=40000, help="synthetic: training tokens")
    # model data
    p.add_argument("--model", default=None, help="model for --data model (default: the embedded SmolLM2-135M)")
    p.add_argument("--layer", type=int, default=None, help="hooked decoder block (default: the trainer's default)")
    p.add_argument("--tokens", type=int, default=60000, help="model: activation tokens to cache (train + eval)")
    p.set_defaults(func=main)


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


def main(args) -> int:
    if args.threads < 1:
        raise SystemExit("aosae ablate: --threads must be >= 1")
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(previous)


def _run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arms = tuple(a.strip() for a in args.arms.split(",") if a.strip())
    bad = [a for a in arms if a not in A.ARMS]
    if bad:
        raise SystemExit(f"aosae ablate: unknown arm(s) {bad}; choose from {', '.join(A.ARMS)}")
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
