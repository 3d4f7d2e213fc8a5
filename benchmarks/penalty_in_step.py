"""The penalty's share of the sweep's own training step, timed inside the step (issue 20).

    python benchmarks/penalty_in_step.py [--width 262144] [--trained-steps 5] [--steps 8]

The width sweep runs each arm in its own process; at d_sae 262144 one arm at a time, in blocks of
a few steps, and its steps move by ±1 s from block to block (benchmarks/NOTES.md, eighth pass),
more than the penalty costs. Here the sweep's BatchTopK + penalty arm (benchmarks/width_arms.py:
pre-training without the penalty, then steps with it) runs in one process, and the C++ kernels
of the penalty's sum (forward and backward) are timed inside each step by wrapping them. Reports
per step the step's time, the kernels' time, and the share; JSON under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", type=int, default=262144)
    p.add_argument("--trained-steps", type=int, default=5)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--tokens", type=int, default=30000)
    p.add_argument("--workdir", default=os.environ.get("TMPDIR", "/tmp"))
    p.add_argument("--tag", default="")
    args = p.parse_args()

    import torch

    import width_arms
    from aosae.ops import extension
    from machine import machine_name, versions
    from width_sweep import prepare_data

    torch.set_num_threads(args.threads)
    module = extension.require()
    spent = {"forward": 0.0, "backward": 0.0, "calls": 0}
    forward, backward = module.sparse_csr_topk_sum, module.sparse_csr_topk_sum_backward

    def timed_forward(*a, **k):
        t = time.perf_counter()
        out = forward(*a, **k)
        spent["forward"] += time.perf_counter() - t
        spent["calls"] += 1
        return out

    def timed_backward(*a, **k):
        t = time.perf_counter()
        out = backward(*a, **k)
        spent["backward"] += time.perf_counter() - t
        return out

    module.sparse_csr_topk_sum, module.sparse_csr_topk_sum_backward = timed_forward, timed_backward
    x = width_arms.load_data(prepare_data(types.SimpleNamespace(workdir=args.workdir, tokens=args.tokens), 576))
    arm = types.SimpleNamespace(arm="aosae-batchtopk+penalty", d_in=576, width=args.width, k=64, seed=0,
                                batch=args.batch)
    step = width_arms.build_arm(arm, x)
    for i in range(args.trained_steps):
        step.pretrain(width_arms.batch_of(x, args.batch, 1, i))
    rows = []
    for r in range(args.steps):
        spent.update(forward=0.0, backward=0.0, calls=0)
        xb = width_arms.batch_of(x, args.batch, 0, r)
        t = time.perf_counter()
        step(xb)
        total = time.perf_counter() - t
        kernels = spent["forward"] + spent["backward"]
        rows.append({"step": r, "step_s": total, "forward_s": spent["forward"], "backward_s": spent["backward"],
                     "kernel_calls": spent["calls"], "share": kernels / total})
        print(f"step {r}: {total:6.2f} s, penalty kernels {spent['forward'] * 1e3:6.1f} + "
              f"{spent['backward'] * 1e3:6.1f} ms ({kernels / total:.1%})", flush=True)
    steps_s = sum(row["step_s"] for row in rows)
    kernels_s = sum(row["forward_s"] + row["backward_s"] for row in rows)
    print(f"over {len(rows)} steps: kernels {kernels_s:.2f} s of {steps_s:.2f} s, step ÷ step without them "
          f"{steps_s / (steps_s - kernels_s):.3f}")
    out = {"bench": "penalty_in_step", "width": args.width, "batch": args.batch, "d_in": 576, "k": 64,
           "trained_steps": args.trained_steps, "steps": rows, "steps_s": steps_s, "kernels_s": kernels_s,
           "ratio_without_kernels": steps_s / (steps_s - kernels_s), "machine": machine_name(),
           "threads": args.threads, "versions": versions(), "date": datetime.date.today().isoformat()}
    here = os.path.dirname(os.path.abspath(__file__))
    tag = f"-{args.tag}" if args.tag else ""
    path = os.path.join(here, "results", f"penalty-in-step-{args.width}-trained-{args.trained_steps}{tag}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
