"""Does fusing the encoder product with a per-row running top-k pay on CPU? (issue 20)

The TopK step's forward computes pre = (x − b_dec) W_enc + b_enc, [B, n], then keeps the k largest
per row. A fused form tiles the product over latent columns and keeps a running top-k per row, so
[B, n] is never written: its gain is bounded by the [B, n] write (first touch of a fresh buffer) and
the top-k pass over it. Every arm uses MKL's GEMM for the product (`addmm`, or `mm` where the kernel
adds the bias). The tiled arms are aosae's own `tiled_topk` (which the TopK step runs on CPU, in tiles
of at most TOPK_TILE latents): one [B, T] tile at a time, each tile's top-k merged into the running
one, into a buffer kept between calls (tiled_T, as the step keeps it: tile_buffer) or a fresh one each
call (tiled_T_fresh). Each tile is a plain product whose bias the C++ row_topk adds as it selects
(float32); tiled_T_torch is the same tiling with addmm and torch.topk into a fresh buffer
(kernel=False), what the step ran above 32768 latents before that kernel (below it, the unfused arm).
Each timed result is checked against the unfused arm first (the same values up to float32 rounding).

    python benchmarks/encoder_topk_fusion.py [--widths 65536,262144] [--tiles 4096,16384]
        [--batch 2048] [--d-in 576] [--k 64] [--rounds 5] [--out benchmarks/results/encoder_topk_fusion.json]

Arms alternate within each round; every arm gets the same warm-up and rounds; the median and the
spread (min–max) across rounds are reported. Peak memory is the arithmetic of what each arm
allocates on top of x and W_enc (the [B, n] pre-activations against one [B, T] tile).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from aosae.ops.latent_selection import tiled_topk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import git_commit  # noqa: E402


def unfused(x, W_enc, b_enc, k):
    pre = torch.addmm(b_enc, x, W_enc)
    return pre.topk(k, dim=1, sorted=False)


def same(a, b, pre) -> bool:
    """a is a top-k of pre as b is: distinct latents per row, each value pre's entry at its latent,
    and the same sorted values as b's (up to float32 rounding: the arms add the bias before or
    after the product, so the last bits may differ, and a near-tie may swap two latents)."""
    tol = dict(rtol=1e-5, atol=1e-5)
    distinct = bool((a[1].sort(1).values.diff(dim=1) != 0).all())
    return distinct and torch.allclose(pre.gather(1, a[1]), a[0], **tol) and torch.allclose(
        a[0].sort(1, descending=True).values, b[0].sort(1, descending=True).values, **tol)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", default="65536,262144")
    p.add_argument("--tiles", default="4096,16384")
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results/encoder_topk_fusion.json")
    a = p.parse_args()
    from aosae.machine import cpu_name

    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, a.d_in, generator=g)
    rows = []
    for n in (int(v) for v in a.widths.split(",")):
        W_enc = torch.randn(n, a.d_in, generator=g).t() / a.d_in ** 0.5  # column-major, as the SAE stores it
        b_enc = 0.01 * torch.randn(n, generator=g)
        tiles = [int(t) for t in a.tiles.split(",") if int(t) <= n]
        bufs = {t: torch.empty(a.batch, t) for t in tiles}
        # aosae's own tiled_topk (what the TopK step runs): with a buffer kept between calls, and
        # with a fresh one each call
        arms = {"unfused": lambda: unfused(x, W_enc, b_enc, a.k),
                **{f"tiled_{t}": (lambda t=t: tiled_topk(x, W_enc, b_enc, a.k, t, bufs[t])) for t in tiles},
                **{f"tiled_{t}_fresh": (lambda t=t: tiled_topk(x, W_enc, b_enc, a.k, t, torch.empty(a.batch, t)))
                   for t in tiles},
                **{f"tiled_{t}_torch": (lambda t=t: tiled_topk(x, W_enc, b_enc, a.k, t, torch.empty(a.batch, t),
                                                               kernel=False)) for t in tiles}}
        reference = arms["unfused"]()
        pre = torch.addmm(b_enc, x, W_enc)
        for name, fn in arms.items():  # the check doubles as the warm-up, the same for every arm
            if not same(fn(), reference, pre):
                raise SystemExit(f"{name} disagrees with the unfused top-k at n={n}")
        del pre
        times = {name: [] for name in arms}
        for _ in range(a.rounds):
            for name, fn in arms.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        product = 2 * a.batch * a.d_in * n
        base = statistics.median(times["unfused"])
        for name, ts in times.items():
            tile = n if name == "unfused" else int(name.split("_")[1])  # (tiled_T, tiled_T_fresh, tiled_T_torch)
            rows.append({"n": n, "arm": name, "median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts),
                         "ratio_to_unfused": statistics.median(ts) / base, "gflops": product / statistics.median(ts) / 1e9,
                         "extra_bytes": a.batch * tile * 4})
            print(f"n={n:>7} {name:<12} {statistics.median(ts):7.3f} s [{min(ts):.3f}–{max(ts):.3f}] "
                  f"×{statistics.median(ts) / base:.2f}  {product / statistics.median(ts) / 1e9:5.1f} GFLOP/s  "
                  f"[B, tile] {a.batch * tile * 4 / 2**20:.0f} MiB")
    out = {"benchmark": "encoder_topk_fusion", "machine": f"{cpu_name()}", "threads": torch.get_num_threads(),
           "torch": torch.__version__, "python": platform.python_version(), "date": datetime.date.today().isoformat(),
           "load_average_1min_at_end": os.getloadavg()[0], "commit": git_commit(), "command": " ".join(sys.argv),
           "batch": a.batch, "d_in": a.d_in, "k": a.k, "rounds": a.rounds, "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
