"""The sparse SAE step against the dense one (CPU, fp32): primitives, TopK/BatchTopK steps, and
where a ReLU SAE's sparse step starts to pay (SparseAutoencoder's RELU_SPARSE_DENSITY).

    python benchmarks/sparse_step.py [--d-sae 16384] [--batch 2048] [--d-in 576] [--k 64] [--reps 3]
        [--part primitives,topk,relu] [--optimizer] [--out benchmarks/results/sparse_step.json]

Arms alternate within each repetition; reported per arm: median, quartiles, min and every time,
and for the steps the per-repetition sparse ÷ dense ratio (median and quartiles).
"dense" is the step as it was before the sparse path: dense latents [B, n], dense decode and a
dense encoder backward (aosae.ops.sparse_coding_reference + autograd). No penalty in these arms.
--optimizer: each step ends with an AdamW step (lr 0, so the weights and the ReLU densities stay
where b_enc put them; the optimizer's arithmetic is the same at any lr): the whole training step.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from aosae.nn.sae import SparseAutoencoder
from aosae.ops import sparse_coding as sc
from aosae.ops import sparse_coding_reference as ref

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import git_commit, machine_name, spread, today, versions  # noqa: E402


def timed(fn, reps):
    fn()  # warm-up
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def alternate(arms: dict, reps: int) -> dict:
    for fn in arms.values():
        fn()
    times = {name: [] for name in arms}
    for _ in range(reps):
        for name, fn in arms.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    out = {name: {**spread(ts), "times": ts} for name, ts in times.items()}
    if "sparse" in times and "dense" in times:
        out["sparse ÷ dense (per repetition)"] = spread([s / d for s, d in zip(times["sparse"], times["dense"])])
    return out


def primitives(B, n, d, k, reps):
    g = torch.Generator().manual_seed(0)
    W_dec, grad = torch.randn(n, d, generator=g), torch.randn(B, d, generator=g)
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(B)]).reshape(-1)
    vals = torch.rand(B * k, generator=g)
    offsets = torch.arange(B + 1) * k
    rows = sc.token_of_entry(offsets, B * k)
    order, lat_off = sc.group_by(idx, n)
    nnz_bytes = B * k * d * 4
    res = {}
    res["decode (segment_gather_sum, table W_dec)"] = alternate(
        {"sparse": lambda: sc.segment_gather_sum(offsets, idx, vals, W_dec),
         "dense": lambda: torch.zeros(B, n).index_put_((rows, idx), vals) @ W_dec}, reps)
    res["W_dec grad (segment_gather_sum by latent, table dL/dx_hat)"] = alternate(
        {"sparse": lambda: sc.segment_gather_sum(lat_off, rows[order], vals[order], grad),
         "dense": lambda: torch.zeros(B, n).index_put_((rows, idx), vals).t() @ grad}, reps)
    res["values grad (gathered_dot)"] = alternate(
        {"sparse": lambda: sc.gathered_dot(rows, idx, grad, W_dec),
         "dense": lambda: (grad @ W_dec.t())[rows, idx]}, reps)
    res["grouping by latent (argsort + bincount)"] = alternate({"sparse": lambda: sc.group_by(idx, n)}, reps)
    res["encoder product (addmm, the floor of any exact step)"] = alternate(
        {"dense": lambda: torch.addmm(torch.zeros(n), grad, W_dec.t())}, reps)
    floor = {"gathered bytes per primitive (nnz·d·4)": nnz_bytes,
             "flops per primitive (2·nnz·d)": 2 * B * k * d, "encoder product flops (2·B·d·n)": 2 * B * d * n}
    return res, floor


def make_sae(activation, n, d, k, shift=0.0, optimizer=False):
    sae = SparseAutoencoder.from_dims(d, n, activation=activation, top_k=k,)
    with torch.no_grad():
        sae.b_enc.fill_(shift)
    if optimizer:
        OPTIMIZERS[sae] = torch.optim.AdamW(sae.parameters(), lr=0.0, weight_decay=0.0)
    return sae


OPTIMIZERS: dict = {}  # sae -> AdamW(lr 0) when --optimizer


def optimizer_step(sae):
    if sae in OPTIMIZERS:
        OPTIMIZERS[sae].step()


def dense_step(sae, x, activation, k):
    f, x_hat = ref.encode_decode(x, sae.W_enc, sae.b_enc, sae.b_dec, sae.W_dec, activation, k)
    loss = (x - x_hat).pow(2).sum(-1).mean() + 0.04 * f.abs().sum(-1).mean()
    sae.zero_grad(set_to_none=True)
    loss.backward()
    optimizer_step(sae)


def sparse_step(sae, x):
    out = sae(x, train=True)
    loss = (x - out.x_hat).pow(2).sum(-1).mean() + 0.04 * out.sparse.values.abs().sum() / x.shape[0] \
        if not out.is_dense else (x - out.x_hat).pow(2).sum(-1).mean() + 0.04 * out.latents.sum(-1).mean()
    sae.zero_grad(set_to_none=True)
    loss.backward()
    optimizer_step(sae)


def steps(B, n, d, k, reps, optimizer=False):
    x = torch.randn(B, d) / d ** 0.5
    res = {}
    for activation in ("topk", "batchtopk"):
        sae = make_sae(activation, n, d, k, optimizer=optimizer)
        res[activation] = alternate({"dense": lambda: dense_step(sae, x, activation, k),
                                     "sparse": lambda: sparse_step(sae, x)}, reps)
    return res


def relu_switch(B, n, d, reps, shifts=(-0.02, -0.05, -0.08, -0.1, -0.12, -0.15), optimizer=False):
    """Forward + backward of a ReLU SAE, dense against sparse, at several densities (set by b_enc)."""
    from aosae.nn import sae as sae_module

    x = torch.randn(B, d) / d ** 0.5
    res = {}
    for shift in shifts:
        sae = make_sae("relu", n, d, None, shift, optimizer)
        with torch.no_grad():
            density = float((sae.pre_activations(x) > 0).double().mean())
        saved = sae_module.RELU_SPARSE_DENSITY
        try:
            sae_module.RELU_SPARSE_DENSITY = 1.0  # force the sparse path whatever the density
            t = alternate({"dense": lambda: dense_step(sae, x, "relu", None), "sparse": lambda: sparse_step(sae, x)}, reps)
        finally:
            sae_module.RELU_SPARSE_DENSITY = saved
        res[f"density {density:.4f}"] = t
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-sae", type=int, default=16384)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--part", default="primitives,topk,relu")
    p.add_argument("--relu-shifts", default="-0.02,-0.05,-0.08,-0.1,-0.12,-0.15",
                   help="b_enc values of the ReLU arms (with x of unit norm: -0.0685 ≈ 5%% density at d_in 576)")
    p.add_argument("--optimizer", action="store_true", help="end every step with an AdamW step (lr 0)")
    p.add_argument("--out", default="benchmarks/results/sparse_step.json")
    a = p.parse_args()
    torch.manual_seed(0)
    parts = a.part.split(",")
    result = {"machine": {"cpu": machine_name(), "threads": torch.get_num_threads(), **versions(),
                          "load_avg_at_start": os.getloadavg()},
              "shape": {"B": a.batch, "d_sae": a.d_sae, "d_in": a.d_in, "k": a.k}, "optimizer": a.optimizer,
              "date": today(), "commit": git_commit(), "command": " ".join(sys.argv)}
    if "primitives" in parts:
        result["primitives_s"], result["floor"] = primitives(a.batch, a.d_sae, a.d_in, a.k, a.reps)
    if "topk" in parts:
        result["step_s"] = steps(a.batch, a.d_sae, a.d_in, a.k, a.reps, a.optimizer)
    if "relu" in parts:
        shifts = tuple(float(v) for v in a.relu_shifts.split(","))
        key = "relu_step_s" if a.optimizer else "relu_fwd_bwd_s"
        result[key] = relu_switch(a.batch, a.d_sae, a.d_in, a.reps, shifts, a.optimizer)
    result["machine"]["load_avg_at_end"] = os.getloadavg()
    print(json.dumps(result, indent=1))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
