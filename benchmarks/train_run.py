"""A whole default-length `aosae train` run with and without the penalty, steps interleaved.

Two Trainers on the same cached activations, same config and seed, one with the penalty
(the default recipe) and one with --no-ortho, step alternately (A B, B A, ...), so both arms
see the same machine load. Every step of both is timed, dense phase included (a ReLU SAE
starts at L0 ≈ n/2). The ratio is Σ step time with ÷ Σ without, over the whole run and
split at the first step whose L0 (penalty arm) falls below n/50.

  python benchmarks/train_run.py --d-sae 16384   -> benchmarks/results/train_run-<machine>.json

A default run at d_sae 16384 takes ~40 min per arm pair on 2 cores.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402

from aosae.training.config import TrainConfig  # noqa: E402
from aosae.training.trainer import Trainer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-sae", type=int, default=16384)
    p.add_argument("--steps", type=int, default=None, help="default: TrainConfig's (a default-length run)")
    p.add_argument("--activation", default="relu", choices=["relu", "topk"])
    args = p.parse_args()
    extra = {} if args.steps is None else {"steps": args.steps}
    if args.activation == "topk":
        extra["activation"] = "topk"
    with tempfile.TemporaryDirectory() as tmp:
        arms = {}
        for name, ortho in (("with", True), ("without", False)):
            cfg = TrainConfig(d_sae=args.d_sae, ortho=ortho, out=str(Path(tmp) / name), **extra)
            arms[name] = Trainer(cfg, progress=False)
        steps = arms["with"].cfg.steps
        rows = []
        for s in range(steps):
            order = ("with", "without") if s % 2 == 0 else ("without", "with")
            row = {"step": s + 1}
            for name in order:
                t0 = time.perf_counter()
                out = arms[name]._train_step()
                row[f"{name}_s"] = time.perf_counter() - t0
                row[f"{name}_l0"] = out["l0"]
            rows.append(row)
            print(f"step {s + 1:4d}  L0 {row['with_l0']:8.1f}  with {row['with_s']:6.2f} s  "
                  f"without {row['without_s']:6.2f} s", flush=True)
        for trainer in arms.values():
            trainer.buffer.close()
    n = args.d_sae
    first_sparse = next((r["step"] for r in rows if r["with_l0"] < n / 50), steps + 1)

    def ratio(part):
        return sum(r["with_s"] for r in part) / sum(r["without_s"] for r in part) if part else None

    dense, sparse = [r for r in rows if r["step"] < first_sparse], [r for r in rows if r["step"] >= first_sparse]
    summary = {
        "bench": "train_run", "d_sae": n, "activation": args.activation, "steps": steps,
        "batch": arms["with"].cfg.batch_size, "recipe": "TrainConfig defaults (the paper's penalty), --no-ortho arm",
        "ratio_whole_run": ratio(rows), "with_total_s": sum(r["with_s"] for r in rows),
        "without_total_s": sum(r["without_s"] for r in rows),
        "first_step_l0_below_n_over_50": first_sparse, "ratio_dense_phase": ratio(dense),
        "ratio_after_dense_phase": ratio(sparse),
        "per_step_ratio_after_dense_phase_median": statistics.median(r["with_s"] / r["without_s"] for r in sparse)
        if sparse else None,
        "rows": rows,
    }
    machine.write_summary("train_run", summary, bulky="rows")


if __name__ == "__main__":
    main()
