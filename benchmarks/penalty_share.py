"""The penalty's share of one SAE's training step: the same SAE steps with and without it,
alternating step by step in one process (issue 20's ≤ 1.05× target).

width_sweep.py times "X" and "X+penalty" as two arms, each its own SAE in its own process; their
per-round ratio also carries what differs between the two processes (their trained latents'
layout, their heaps; benchmarks/NOTES.md, eighth and eleventh passes), which at d_sae 16384 moved
the ratio by as much as the penalty costs. Here one SAE takes round r's batch twice, once with the
penalty and once without (the order reversed every other round), so the per-round ratio is the
penalty's cost alone. Both steps train the SAE: it drifts as the sweep's arms do.

    python benchmarks/penalty_share.py --width 16384 --activation topk --rounds 60 --tag T

writes results/penalty-share-<machine>[-T].json: per round the two steps' times (s), the ratio's
median and quartiles, and the median of the paired difference.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import machine  # noqa: E402
from width_arms import aosae_objective, batch_of, load_data, make_aosae  # noqa: E402
from width_sweep import prepare_data  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=16384)
    p.add_argument("--activation", choices=("topk", "batchtopk"), default="topk")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokens", type=int, default=30000)
    p.add_argument("--workdir", default=os.environ.get("TMPDIR", "/tmp"), help="where the activations file is kept")
    p.add_argument("--tag", default="")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    x = load_data(prepare_data(types.SimpleNamespace(workdir=args.workdir, tokens=args.tokens), args.d_in))
    sae = make_aosae(args.d_in, args.width, args.activation, args.k, x, args.seed)
    obj = aosae_objective(sae, penalty=True)
    ortho = obj.ortho
    if ortho is None:
        raise SystemExit("penalty_share: the objective has no penalty to switch off")

    def step(xb, with_penalty: bool) -> float:
        obj.ortho = ortho if with_penalty else None
        start = time.perf_counter()
        obj.optimizer_step(obj.losses(xb).loss)
        return time.perf_counter() - start

    rounds = []
    for r in range(args.warmup + args.rounds):
        xb = batch_of(x, args.batch, args.seed, r)
        order = (True, False) if r % 2 == 0 else (False, True)
        t = {flag: step(xb, flag) for flag in order}
        if r >= args.warmup:
            rounds.append({"with_s": t[True], "without_s": t[False]})
    obj.ortho = ortho

    ratios = [q["with_s"] / q["without_s"] for q in rounds]
    row = {
        "width": args.width, "activation": args.activation, "k": args.k, "batch": args.batch, "d_in": args.d_in,
        "l1_coeff": obj.l1_coeff, "rounds": rounds, "ratio": machine.spread(ratios),
        "with_s": machine.spread([q["with_s"] for q in rounds]),
        "without_s": machine.spread([q["without_s"] for q in rounds]),
        "paired_difference_ms": 1e3 * statistics.median(q["with_s"] - q["without_s"] for q in rounds),
        "threads": args.threads, "machine": machine.machine_name(), "versions": machine.versions(),
        "date": machine.today(), "commit": machine.git_commit(), "command": " ".join(sys.argv),
    }
    out = machine.RESULTS / f"penalty-share-{machine.slug(machine.machine_name())}{'-' + args.tag if args.tag else ''}.json"
    machine.write_rows(out, [row])
    r = row["ratio"]
    print(f"d_sae {args.width} {args.activation}: with / without penalty {r['median']:.3f} "
          f"[{r['q1']:.3f}, {r['q3']:.3f}], steps {row['without_s']['median']:.3f} s without, "
          f"paired difference {row['paired_difference_ms']:.1f} ms; wrote {out}")


if __name__ == "__main__":
    main()
