"""The penalty on a BatchTopK batch while k < P: its sum without the list against the selection.

    python benchmarks/penalty_sum.py [--widths 16384 65536] [--trained-steps 0] [--rounds 9]
                                     [--arms sum selection] [--tag NAME]

The batch is the width sweep's (benchmarks/width_sweep.py: the default model's activations, B 2048,
d_in 576, BatchTopK k 64, the same seed), encoded by a fresh SAE, or by one trained for
--trained-steps steps of the sweep's objective with the penalty (BatchTopK at 262144 puts one
token on every active latent from about step 5 on). On those latents, forward + backward of the
sum reduction's two exact routes:
  sum        aosae.ops.coactive_sum.coactive_topk_sum: the kernel's k-th score and the sum of
             the pairs it keeps; the backward recomputes the scores and keeps them by that cut;
  selection  aosae.ops.coactive_topk(ordered=False).values.abs().sum(): the k pairs written and
             differentiated (what TopKOrthoLoss did before).
Both are checked against each other (value and gradient) before any timing; the arms alternate
round by round after one warm-up call each. Reported per width: k, the co-active pairs' bound,
the block's width, each arm's forward and backward (median, quartiles, min, max), and the ratio
of the sums of the medians. Writes results/penalty-sum-<machine>[-tag].json.
A benchmark, not a test: numbers depend on the machine and on what else runs on it.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import width_arms  # noqa: E402
from machine import RESULTS, machine_name, slug, spread, today, versions, write_rows  # noqa: E402
from width_sweep import prepare_data  # noqa: E402

ARMS = ("sum", "selection")


def batch_latents(x, n: int, trained_steps: int, batch: int):
    """The sweep's BatchTopK latents at n after trained_steps steps (offsets, indices, values)."""
    sae = width_arms.make_aosae(x.shape[1], n, "batchtopk", 64, x, 0)
    objective = width_arms.aosae_objective(sae, True)
    for r in range(trained_steps):
        objective.optimizer_step(objective.losses(width_arms.batch_of(x, batch, 0, r)).loss)
    with torch.no_grad():
        latents = sae.encode_sparse(width_arms.batch_of(x, batch, 0, trained_steps), train=True)
    out = latents.offsets.clone(), latents.indices.clone(), latents.values.detach().clone()
    del sae, objective, latents
    gc.collect()
    return out


def penalty(arm: str, offsets, indices, values, n: int, k: int):
    from aosae.ops.coactive_sum import coactive_topk_sum
    from aosae.ops.coactive_topk import coactive_topk

    if arm == "sum":
        found = coactive_topk_sum(offsets, indices, values, n, k)
        if found is None:
            raise RuntimeError("coactive_topk_sum declined (needs aosae._C on CPU): build the extension")
        return found.total
    return coactive_topk(offsets, indices, values, n, k, ordered=False).values.abs().sum()


def timed(arm: str, latents, n: int, k: int):
    """(forward s, backward s, value, gradient) of one call."""
    offsets, indices, values = latents
    v = values.clone().requires_grad_()
    t0 = time.perf_counter()
    total = penalty(arm, offsets, indices, v, n, k)
    t1 = time.perf_counter()
    total.backward()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, total.detach(), v.grad


def measure(x, n: int, args) -> dict:
    from aosae.ops import coactive_topk as co
    from aosae.ops import extension
    from aosae.ops.coactive_sum import pairs_bound
    from aosae.ops.gram_topk import k_for_fraction

    latents = batch_latents(x, n, args.trained_steps, args.batch)
    offsets, indices, values = latents
    k = k_for_fraction(n, 0.005)
    lengths = offsets[1:] - offsets[:-1]
    c = co.canonical(offsets, indices, values)
    block = extension.require().sparse_dense_rows(c.row_ptr, c.cols, c.vals.float(), c.uniq.numel(), recomputed=True)
    row = {"d_sae": n, "batch": args.batch, "trained_steps": args.trained_steps, "k": k,
           "pairs_bound": pairs_bound(offsets, indices), "row_pairs": int((lengths * (lengths - 1) // 2).sum()),
           "max_l0": int(lengths.max()), "block_rows": block.numel(), "active_latents": c.uniq.numel()}
    # checked first: the arms agree (value and gradient) before anything is timed
    first = {arm: timed(arm, latents, n, k) for arm in args.arms}
    if len(first) == 2:
        (_, _, total_a, grad_a), (_, _, total_b, grad_b) = first.values()
        row["check"] = {"value_rel_gap": float((total_a - total_b).abs() / total_b.abs().clamp_min(1e-30)),
                        "grad_max_gap_rel": float((grad_a - grad_b).abs().max() / grad_b.abs().max().clamp_min(1e-30))}
        if row["check"]["value_rel_gap"] > 1e-5 or row["check"]["grad_max_gap_rel"] > 1e-4:
            raise RuntimeError(f"d_sae {n}: the arms disagree: {row['check']}")
    times = {arm: ([], []) for arm in args.arms}
    for _ in range(args.rounds):
        for arm in args.arms:
            forward, backward, _, _ = timed(arm, latents, n, k)
            times[arm][0].append(forward)
            times[arm][1].append(backward)
    for arm, (forward, backward) in times.items():
        row[arm] = {**spread(forward, "_forward_s"), **spread(backward, "_backward_s"), "forward_s": forward,
                    "backward_s": backward}
    if len(times) == 2:
        total = {arm: row[arm]["median_forward_s"] + row[arm]["median_backward_s"] for arm in times}
        row["sum_over_selection"] = total["sum"] / total["selection"]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", type=int, nargs="+", default=[16384, 65536])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--trained-steps", type=int, default=0)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--tokens", type=int, default=30000)
    p.add_argument("--workdir", default=os.environ.get("TMPDIR", "/tmp"), help="where the activations file is kept")
    p.add_argument("--tag", default="")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    x = width_arms.load_data(prepare_data(types.SimpleNamespace(workdir=args.workdir, tokens=args.tokens), 576))
    rows = []
    for n in args.widths:
        row = measure(x, n, args)
        row.update(machine=machine_name(), versions=versions(), date=today(), threads=args.threads,
                   loadavg=list(os.getloadavg()))
        rows.append(row)
        arms = "  ".join(f"{arm} {row[arm]['median_forward_s'] * 1e3:.1f} + {row[arm]['median_backward_s'] * 1e3:.1f} ms"
                         for arm in args.arms)
        ratio = f"  sum / selection {row['sum_over_selection']:.2f}" if "sum_over_selection" in row else ""
        print(f"d_sae {n:>8} k {row['k']:>11,} block rows {row['block_rows']:>3}  {arms}{ratio}", flush=True)
    name = f"penalty-sum-{slug(machine_name())}" + (f"-{args.tag}" if args.tag else "")
    write_rows(RESULTS / f"{name}.json", rows)
    print(f"wrote {RESULTS / name}.json")


if __name__ == "__main__":
    main()
