"""How long a ReLU SAE's dense phase lasts and what the penalty costs during it.

A ReLU SAE starts with L0 ≈ n/2 (half the pre-activations are positive), where the penalty's
exact work is the fused dense kernel's B·n²/2 multiply-adds. This runs the trainer's own steps
(Trainer._train_step, default recipe) at d_sae 16384 on the cached default activations and
logs L0 per step. A step with the penalty costs over a minute in the dense phase on 2 cores,
so the trajectory is run without it (--no-ortho; the L1 term drives L0 down, τ·penalty is a
small term early on) and the penalty's forward + backward is timed on the step's latents
every --every steps and at the first sparse step. It stops --after steps after L0 < n/50.

  python benchmarks/dense_phase.py            -> benchmarks/results/train_step-dense-phase-<machine>.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402

from aosae.nn.loss import TopKOrthoLoss  # noqa: E402
from aosae.ops import backends  # noqa: E402
from aosae.training.config import TrainConfig  # noqa: E402
from aosae.training.trainer import Trainer  # noqa: E402


def time_penalty(loss: TopKOrthoLoss, latents: torch.Tensor) -> tuple[float, float, str]:
    """(forward s, backward s, backend) of the penalty on these latents, as the step computes it."""
    acts = latents.detach().float().requires_grad_()
    backend = backends.resolve(loss.backend, acts.detach())
    t0 = time.perf_counter()
    penalty = loss(acts)
    t1 = time.perf_counter()
    torch.autograd.grad(penalty, acts)
    return t1 - t0, time.perf_counter() - t1, backend


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-sae", type=int, default=16384)
    p.add_argument("--tokens", type=int, default=30000)
    p.add_argument("--max-steps", type=int, default=80)
    p.add_argument("--every", type=int, default=10, help="time the penalty every this many steps")
    p.add_argument("--after", type=int, default=3, help="steps to run once L0 < n/50")
    args = p.parse_args()
    n = args.d_sae
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(tokens=args.tokens, d_sae=n, ortho=False, out=str(Path(tmp) / "run"))
        trainer = Trainer(cfg, progress=False)
        loss = TopKOrthoLoss(cfg.fraction, similarity=cfg.similarity)
        seen = {}
        losses = trainer.objective.losses

        def keep_latents(x):
            out = losses(x)
            seen["latents"] = out.latents
            return out

        trainer.objective.losses = keep_latents
        steps, below = [], None
        for s in range(args.max_steps):
            t0 = time.perf_counter()
            row = trainer._train_step()
            entry = {"step": row["step"], "l0": row["l0"], "step_s": time.perf_counter() - t0}
            first_sparse = below is None and row["l0"] < n / 50
            if s % args.every == 0 or first_sparse or (below is not None and s == below + args.after):
                fwd, bwd, backend = time_penalty(loss, seen["latents"])
                entry.update(penalty_forward_s=fwd, penalty_backward_s=bwd, backend=backend)
            seen.clear()
            steps.append(entry)
            timed = f"  penalty fwd {entry['penalty_forward_s']:6.2f} s bwd {entry['penalty_backward_s']:6.2f} s ({entry['backend']})" \
                if "backend" in entry else ""
            print(f"step {row['step']:3d}  L0 {row['l0']:8.1f}  step (no penalty) {entry['step_s']:6.2f} s{timed}", flush=True)
            if first_sparse:
                below = s
            if below is not None and s >= below + args.after:
                break
    timed = [r for r in steps if "backend" in r]
    dense_steps = sum(r["l0"] >= n / 50 for r in steps)

    def penalty_at(step):  # linear between the timed steps (the cost falls with L0)
        before = max((r for r in timed if r["step"] <= step), key=lambda r: r["step"])
        after = min((r for r in timed if r["step"] >= step), key=lambda r: r["step"], default=before)
        cost = lambda r: r["penalty_forward_s"] + r["penalty_backward_s"]  # noqa: E731
        if after["step"] == before["step"]:
            return cost(before)
        w = (step - before["step"]) / (after["step"] - before["step"])
        return (1 - w) * cost(before) + w * cost(after)

    dense_penalty = sum(penalty_at(r["step"]) for r in steps if r["l0"] >= n / 50)
    sparse_timed = [r for r in timed if r["l0"] < n / 50]
    sparse_penalty = statistics.median(r["penalty_forward_s"] + r["penalty_backward_s"] for r in sparse_timed) if sparse_timed else None
    floor = statistics.median(r["step_s"] for r in steps)
    run_floor = cfg.steps * floor
    run_penalty = dense_penalty + (cfg.steps - dense_steps) * (sparse_penalty or 0.0)
    summary = {
        "bench": "dense_phase", "d_sae": n, "batch": cfg.batch_size, "steps_default_run": cfg.steps,
        "dense_steps": dense_steps, "dense_phase_penalty_s": dense_penalty, "floor_step_median_s": floor,
        "sparse_penalty_median_s": sparse_penalty,
        "predicted_run_ratio": (run_floor + run_penalty) / run_floor,
        "predicted_run_ratio_without_dense_phase": (run_floor + cfg.steps * (sparse_penalty or 0.0)) / run_floor,
        "note": "trajectory without the penalty; penalty timed on the step's latents every `every` steps, "
                "linear in between; run ratio = (floor + penalty) / floor over the default 400 steps",
        "every": args.every, "steps": steps,
    }
    machine.write_summary("train_step-dense-phase", summary, bulky="steps")


if __name__ == "__main__":
    main()
