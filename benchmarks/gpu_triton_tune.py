"""Where the fused Triton kernel's time goes, and which launch configuration is fastest (GPU).

For a [m, n] bf16 input (default B = m = 4096, n = 16384, k = 0.5 % of the pairs) it times, per
launch configuration (BLOCK, BLOCK_K, num_warps, num_stages, group, TMA):

    mainloop    one collect pass at threshold +inf: the tiles' tl.dot and the compare, no
                candidate is stored (the epilogue's prefix sums and stores are skipped)
    warm_pass   one collect pass at the warm-start threshold (0.9 × the k-th |score| of a
                different batch of the same distribution: the previous training step)
    op          the whole gram_topk_triton call with that hint (pass + exact selection)

against cuBLAS: `torch.mm(aᵀ, a)` (full) and half of it, the fair floor for a kernel that
computes one triangle. Every configuration's result is first checked against the default
configuration's (same pairs, same values). warm_pass − mainloop is the epilogue's cost;
op − warm_pass is the selection's. Rows go to benchmarks/results/triton-tune-<gpu>.json (or
--out), written after each configuration.

    python benchmarks/gpu_triton_tune.py                      # on a GPU
    TRITON_INTERPRET=1 python benchmarks/gpu_triton_tune.py --device cpu   # dry run, tiny shapes
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from gpu_gram_topk import import_aosae, skip_reason  # noqa: E402  (aosae from this tree, its kernels included)

import_aosae()
import torch  # noqa: E402

from aosae.ops.backends import triton_driver  # noqa: E402
from aosae.ops.gram_topk import k_for_fraction  # noqa: E402
from machine import RESULTS, machine_name, slug, spread, today, versions, write_rows  # noqa: E402

# (BLOCK, BLOCK_K, num_warps, num_stages, group, TMA); the first is the shipped default on GPU, the
# next two the same tiles loaded through a tensor descriptor (TMA: no pointer tensors, asynchronous
# loads; compiled for sm_90 they spill 152 bytes where the shipped kernel spills 244, not yet timed),
# then the previous default (kernel_resources.py: 128² tiles take 255 registers, one program per SM;
# 16 warps cap them at 128; 64² tiles at 4 warps fit two or more programs per SM). The first H200
# run (2026-12-04) measured the rest of the earlier list: BLOCK_K 128 was fastest, 64² tiles slowest.
CONFIGS = [
    (128, 128, 8, 3, 8, False), (128, 128, 8, 3, 8, True), (128, 64, 8, 4, 8, True), (128, 64, 8, 3, 8, False),
    (128, 128, 8, 2, 8, False), (128, 128, 8, 3, 16, False), (128, 128, 16, 3, 8, False), (64, 128, 4, 4, 8, False),
]
CPU_CONFIGS = [(16, 16, 4, 1, 4, False), (32, 16, 4, 1, 2, False), (16, 16, 4, 1, 4, True)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def times_ms(fn, device: str, warmup: int, reps: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--m", type=int, default=None)
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--budget-s", type=float, default=240.0, help="stop starting new configurations after this")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    m, n = args.m or (4096 if cuda else 32), args.n or (16384 if cuda else 64)
    reps = args.reps or (10 if cuda else 2)
    dtype = DTYPES[args.dtype]
    device = "cuda" if cuda else "cpu"
    name = machine_name(device)
    out = args.out or (RESULTS / f"triton-tune-{slug(name)}.json" if cuda else Path("/tmp/triton-tune-dry.json"))
    k = k_for_fraction(n, 0.005)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(m, n, device=device, generator=gen).to(dtype)
    prev = torch.randn(m, n, device=device, generator=gen).to(dtype)  # the "previous step"
    hint = float(triton_driver.gram_topk_triton(prev, k)[0][-1].abs())
    thr = hint * 0.9
    cap = 4 * k + 1024
    expected = triton_driver.gram_topk_triton(a, k, threshold=hint)
    started = time.perf_counter()
    header = dict(machine=name, versions=versions(), date=today(), m=m, n=n, k=k, dtype=args.dtype,
                  command=" ".join(sys.argv))
    rows: list[dict] = []

    def save():
        write_rows(out, [header] + rows)

    gemm = spread(times_ms(lambda: torch.mm(a.t(), a), device, args.warmup, reps))
    rows.append({"arm": "cublas_full", **gemm})
    rows.append({"arm": "half_gemm_floor", **{key: v / 2 for key, v in gemm.items()}})
    save()
    for block, block_k, warps, stages, group, tma in (CONFIGS if cuda else CPU_CONFIGS):
        cfg = dict(BLOCK=block, BLOCK_K=block_k, num_warps=warps, num_stages=stages, group=group, TMA=tma)
        row = {"arm": "config", **cfg}
        if time.perf_counter() - started > args.budget_s:
            rows.append({**row, "skipped": f"time budget {args.budget_s} s spent"})
            save()
            continue
        try:
            got = triton_driver.gram_topk_triton(a, k, threshold=hint, config=cfg)
            same = all(torch.equal(x, y) for x, y in zip(got, expected))
            collect, _, _ = triton_driver.make_passes(a, None, cfg)
            count = collect(thr, cap)
            main_loop = spread(times_ms(lambda: collect(math.inf, cap), device, args.warmup, reps))
            warm = spread(times_ms(lambda: collect(thr, cap), device, args.warmup, reps))
            whole = spread(times_ms(lambda: triton_driver.gram_topk_triton(a, k, threshold=hint, config=cfg),
                                    device, args.warmup, reps))
            row.update(same_as_default=same, candidates=count, mainloop=main_loop, warm_pass=warm, op=whole,
                       op_over_half_gemm=whole["median"] / (gemm["median"] / 2),
                       passes=triton_driver.last_call_info.get("passes"))
        except Exception as err:  # a config that does not compile or fit: record, go on
            row["skipped"] = skip_reason(err)
        rows.append(row)
        save()
        print(json.dumps(row), flush=True)
    if cuda:
        torch.cuda.empty_cache()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
