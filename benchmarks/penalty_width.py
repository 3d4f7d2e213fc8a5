"""The penalty on TopK latents across widths: forward + backward time and peak memory.

    python benchmarks/penalty_width.py [--widths 65536 262144 1048576] [--batch 2048] [--l0 64]
                                      [--threads N --tag NAME]

TopKOrthoLoss(fraction=0.005).from_topk on (indices, values) [B, L] (the trainer's TopK path),
one fresh subprocess per width and arm so that each peak RSS is its own. Arms:
  coactive  the training path: min(k, P) pairs through aosae.ops.coactive_topk, never padded, or,
            where k covers every co-active pair (n >= ~41 k at B 2048, L 64; positive values), their
            sum without listing them (aosae.ops.coactive_sum);
  padded    gram_topk_sparse, the padded contract (k slots), what from_topk called before; only
            where its k-sized output fits (--padded-max, default 262144).
Reported per row: the co-active pairs P and k, the first full call's time and peak RSS above the
inputs (after a tiny call that pays the process's one-time imports), the median of the warm
calls (wall and CPU seconds), and the floor the C++ kernel's cost model predicts
(ns per co-active pair, csrc/dense_rows.h). Latents: L distinct ids per row drawn uniformly
(one per stripe of n/L ids, then a random permutation of the n ids): the most distinct pairs a
batch can have, so the most work. Writes results/penalty-width-<machine>.json.
A benchmark, not a test: numbers depend on the machine and on what else runs on it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import (RESULTS, git_commit, machine_name, peak_cpu_memory_mib, slug, today, versions,  # noqa: E402
                     write_rows)


def topk_latents(n: int, batch: int, l0: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    stripe = n // l0
    ids = torch.randint(0, stripe, (batch, l0), generator=gen) + torch.arange(l0) * stripe
    ids = torch.randperm(n, generator=gen)[ids]  # distinct within each row, uniform over the n ids
    values = torch.rand(batch, l0, generator=gen) + 0.05
    return ids, values


def child(n: int, batch: int, l0: int, arm: str, reps: int) -> dict:
    from aosae.nn.loss import TopKOrthoLoss
    from aosae.ops.backends import sparse as sparse_backend
    from aosae.ops.gram_topk import k_for_fraction
    from aosae.ops.gram_topk_sparse import gram_topk_sparse

    t_start = time.perf_counter()
    ids, values = topk_latents(n, batch, l0)
    loss = TopKOrthoLoss(fraction=0.005)
    k = k_for_fraction(n, 0.005)

    def step():
        v = values.clone().requires_grad_()
        if arm == "coactive":
            penalty = loss.from_topk(ids, v, n)
        else:
            penalty = gram_topk_sparse(ids, v, n, k).values.abs().sum() / batch
        penalty.backward()
        return float(penalty)

    # The first call in a process pays one-time costs: torch's custom-op machinery imports
    # torch._dynamo (≈ 2 s, ≈ 0.2 GB of modules) and the extension loads. A tiny call pays them
    # here, so that the first full call's peak (ru_maxrss, exact) is the step's own memory.
    tiny_ids, tiny_values = topk_latents(n, 4, 4)
    loss.from_topk(tiny_ids, tiny_values.requires_grad_(), n).backward()
    warmup_s = time.perf_counter() - t_start
    t0 = time.perf_counter()
    value, peak = peak_cpu_memory_mib(step)
    cold = time.perf_counter() - t0
    warm, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        warm.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    pairs = loss.last_pairs.values.numel() if arm == "coactive" else None
    pair_ns = sparse_backend.cpp_costs()["pair"] if sparse_backend.cpp_module() is not None else None
    bound = batch * l0 * (l0 - 1) // 2
    return {
        "arm": arm, "n": n, "batch": batch, "l0": l0, "k": k, "selected": pairs, "coactive_bound": bound,
        "penalty": value, "cold_s": cold, "warm_median_s": statistics.median(warm), "warm_s": warm,
        # CPU seconds of the process (all threads): less sensitive than wall time to a busy machine
        "warm_cpu_median_s": statistics.median(cpu),
        "peak_rss_above_inputs_mib": peak, "one_time_setup_s": warmup_s,
        # the C++ kernel's own model of its forward: ns per co-active pair (csrc/dense_rows.h)
        "floor_forward_s": None if pair_ns is None else pair_ns * bound * 1e-9,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[65536, 262144, 1 << 20])
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--l0", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--padded-max", type=int, default=262144, help="widest n for the padded arm")
    parser.add_argument("--note", default="", help="what else ran on the machine, if anything")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in each child (0: torch's default)")
    parser.add_argument("--tag", default="", help="suffix of the results file (e.g. 1-thread)")
    parser.add_argument("--child", nargs=2, metavar=("N", "ARM"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.batch, args.l0, args.child[1], args.reps)))
        return
    rows = []
    for n in args.widths:
        for arm in ("coactive", "padded"):
            if arm == "padded" and n > args.padded_max:
                continue
            cmd = [sys.executable, __file__, "--child", str(n), arm, "--batch", str(args.batch), "--l0",
                   str(args.l0), "--reps", str(args.reps), "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                row = {"arm": arm, "n": n, "error": out.stderr.strip().splitlines()[-1:]}
            else:
                row = json.loads(out.stdout.strip().splitlines()[-1])
            row.update(machine=machine_name(), versions=versions(), date=today(), commit=git_commit(),
                       command=" ".join(sys.argv), note=args.note)
            print({key: row.get(key) for key in ("arm", "n", "selected", "cold_s", "warm_median_s",
                                                 "warm_cpu_median_s", "peak_rss_above_inputs_mib", "error")},
                  flush=True)
            rows.append(row)
    tag = f"-{slug(args.tag)}" if args.tag else ""
    write_rows(RESULTS / f"penalty-width-{slug(machine_name())}{tag}.json", rows)


if __name__ == "__main__":
    main()
