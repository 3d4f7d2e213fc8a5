"""GPU benchmark of gram_topk: the fused Triton kernel against the reference and the bare GEMM.

For B = m = 4096 rows and n ∈ {4096, 16384, 65536, 131072} columns, dtypes bf16 and fp32,
k = ceil(0.005 · n(n−1)/2), it times

    triton        the fused kernel, warm start (hint = the k-th |score| of another batch of the
                  same distribution: the previous step's, the training steady state)
    triton_cold   the fused kernel without a hint (sampled threshold estimate)
    reference     materialise C = aᵀa, triu, torch.topk (skipped with a reason when out of memory)
    gemm          torch.mm(aᵀ, a) alone: cuBLAS, no selection, the floor to beat

checks the Triton result against the reference (or, where the reference does not fit,
against exact float64 dot products of the returned pairs), and writes rows
{backend, m, n, k, dtype, ms, peak_mib, passes, device, torch, triton, date} to
benchmarks/results/<gpu-name>.json with a PNG plot beside it. peak_mib is the peak memory
allocated during the call above what was allocated before it (the input).

    python benchmarks/gpu_gram_topk.py             # full sweep on CUDA
    python benchmarks/gpu_gram_topk.py --quick     # n ∈ {4096, 16384}
    python benchmarks/gpu_gram_topk.py --device cpu --quick   # dry run of every code path
                                                              # through Triton's interpreter
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: tiny shapes through TRITON_INTERPRET=1, to test this script without a GPU")
    p.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    p.add_argument("--m", type=int, default=None, help="rows (batch B); default 4096 (16 on cpu)")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="column counts n")
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=("bf16", "fp16", "fp32"))
    p.add_argument("--fraction", type=float, default=0.005, help="k = ceil(fraction · n(n-1)/2)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per row (median reported)")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="default benchmarks/results (cuda) or a temporary folder (cpu dry run)")
    return p.parse_args(argv)


def import_aosae():
    """Imports aosae (its Triton kernels included) from this working tree, installed or not."""
    sys.path.insert(0, str(REPO))
    import aosae

    return aosae


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


class Timer:
    """Median wall time of fn() in ms: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: str):
        self.device = device

    def __call__(self, fn, reps: int) -> float:
        import torch

        fn()  # warm-up: Triton compilation, cuBLAS heuristics, caching allocator
        times = []
        for _ in range(reps):
            if self.device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def peak_extra_mib(fn, device: str) -> float | None:
    """Peak memory allocated while fn() runs, above what was allocated before, in MiB."""
    import torch

    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def skip_reason(err: BaseException) -> str:
    """Why a baseline could not run, for the results row: 'out of memory' or the error's first line."""
    import torch

    if isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower():
        return "out of memory"
    lines = str(err).strip().splitlines()  # a bare AssertionError has no message
    return f"{type(err).__name__}: {lines[0][:200] if lines else ''}"


def free(device: str):
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def check_pairs(a, pairs, k, ref=None):
    """Asserts the Triton result is the exact top-k: pairs valid and unique, values equal to
    float64 dot products (sampled), |values| equal to the reference's where it ran."""
    import torch

    values, rows, cols = pairs
    assert values.shape == rows.shape == cols.shape == (k,)
    filled = rows >= 0
    assert bool((rows[filled] < cols[filled]).all()), "pairs must have row < col"
    flat = rows[filled] * a.shape[1] + cols[filled]
    assert flat.unique().numel() == flat.numel(), "duplicate pairs"
    absv = values.abs()
    assert bool((absv[:-1] >= absv[1:]).all()), "not sorted by |value|"
    # fp32 accumulation over m terms: error relative to the largest score
    scale = float(absv.max()) if k else 1.0
    tol = (1e-4 if a.dtype == torch.float32 else 1e-3) * max(scale, 1e-30)
    pick = torch.randperm(int(filled.sum()), device=a.device)[:4096]
    r, c = rows[filled][pick], cols[filled][pick]
    exact = (a[:, r].double() * a[:, c].double()).sum(0)
    torch.testing.assert_close(values[filled][pick].double(), exact, atol=tol, rtol=0)
    if ref is not None:
        torch.testing.assert_close(absv, ref[0].abs(), atol=tol, rtol=0)
        n = a.shape[1]
        same = int(torch.isin(rows * n + cols, ref[1] * n + ref[2]).sum())
        # pairs may only differ among scores tied with the k-th within rounding
        kth = float(ref[0].abs()[-1])
        near = int((ref[0].abs() <= kth + 2 * tol).sum())
        assert same >= k - near, f"only {same} of {k} pairs agree with the reference ({near} near the k-th score)"


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here; use --device cpu --quick for a dry run through the interpreter", file=sys.stderr)
        return 2
    import triton

    aosae = import_aosae()
    from aosae.ops.backends import reference, triton as triton_backend
    from aosae.ops.backends import triton_driver as kernel

    ok, why = triton_backend.available()
    if not ok:
        print(f"triton backend unavailable: {why}", file=sys.stderr)
        return 2

    if device == "cpu":
        m = args.m or 16
        sizes = args.sizes or ([40, 96] if args.quick else [40, 96, 160])
        reps = args.reps or 1
        device_name = "cpu-interpreter"
    else:
        m = args.m or 4096
        sizes = args.sizes or ([4096, 16384] if args.quick else [4096, 16384, 65536, 131072])
        reps = args.reps or (3 if args.quick else 5)
        device_name = torch.cuda.get_device_name()
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    timer = Timer(device)
    common = dict(m=m, device=device_name, torch=torch.__version__, triton=triton.__version__,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    rows = []

    def record(backend, n, k, dtype_name, ms, peak, passes, **extra):
        row = dict(backend=backend, n=n, k=k, dtype=dtype_name, ms=ms, peak_mib=peak, passes=passes, **common, **extra)
        rows.append(row)
        shown = "skipped: " + extra["skipped"] if "skipped" in extra else f"{ms:10.2f} ms  peak {peak} MiB  passes {passes}"
        print(f"{backend:12s} n={n:6d} {dtype_name} k={k}: {shown}", flush=True)

    gen = torch.Generator(device=device).manual_seed(0)
    for dtype_name in args.dtypes:
        dtype = dtypes[dtype_name]
        for n in sizes:
            k = aosae.k_for_fraction(n, args.fraction)
            a = torch.randn(m, n, device=device, dtype=torch.float32, generator=gen).to(dtype)

            # gemm: the cuBLAS floor (full n × n product, no selection)
            try:
                ms = timer(lambda: torch.mm(a.t(), a), reps)
                record("gemm", n, k, dtype_name, ms, peak_extra_mib(lambda: torch.mm(a.t(), a), device), 1)
            except RuntimeError as err:  # out of memory at the largest sizes
                record("gemm", n, k, dtype_name, None, None, None, skipped=skip_reason(err))
            free(device)

            # reference: also the correctness baseline where it fits
            ref = None
            try:
                ref = reference.forward(a, k, False)
                ms = timer(lambda: reference.forward(a, k, False), reps)
                record("reference", n, k, dtype_name, ms,
                       peak_extra_mib(lambda: reference.forward(a, k, False), device), 1)
            except RuntimeError as err:  # O(n²) memory: out of memory (or topk's size limits) at large n
                ref = None
                record("reference", n, k, dtype_name, None, None, None, skipped=skip_reason(err))
            free(device)

            # triton, cold start: no hint, the sampled estimate picks the threshold
            cold = triton_backend.forward(a, k, False, None)
            check_pairs(a, cold, k, ref)
            ms = timer(lambda: triton_backend.forward(a, k, False, None), reps)
            passes = kernel.last_call_info["passes"]
            record("triton_cold", n, k, dtype_name, ms,
                   peak_extra_mib(lambda: triton_backend.forward(a, k, False, None), device), passes,
                   candidates=kernel.last_call_info["candidates"], stages=kernel.last_call_info["stages"])

            # triton, warm start: the hint is the k-th |score| of ANOTHER batch of the same
            # distribution (the previous training step's), not this batch's own
            prev = torch.randn(m, n, device=device, dtype=torch.float32, generator=gen).to(dtype)
            hint = float(triton_backend.forward(prev, k, False, None)[0].abs()[-1])
            del prev
            warm = triton_backend.forward(a, k, False, hint)
            for x, y in zip(cold, warm):
                assert torch.equal(x, y), "warm start changed the result"
            ms = timer(lambda: triton_backend.forward(a, k, False, hint), reps)
            passes = kernel.last_call_info["passes"]
            record("triton", n, k, dtype_name, ms,
                   peak_extra_mib(lambda: triton_backend.forward(a, k, False, hint), device), passes,
                   candidates=kernel.last_call_info["candidates"], stages=kernel.last_call_info["stages"])
            del a, ref, cold, warm
            free(device)

    if args.out_dir is None:
        args.out_dir = REPO / "benchmarks" / "results" if device == "cuda" else Path(tempfile.gettempdir()) / "aosae-gpu-bench-dry-run"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    name = slug(device_name) + ("-quick" if args.quick else "")
    out = args.out_dir / f"{name}.json"
    out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {out}")
    plot(rows, args.out_dir / f"{name}.png", device_name, m)
    summarize(rows)
    return 0


def summarize(rows):
    """Prints triton ÷ gemm and reference ÷ triton per size, the figures of the targets."""
    by = {(r["backend"], r["n"], r["dtype"]): r for r in rows}
    for (backend, n, dtype), r in sorted(by.items(), key=lambda x: (x[0][2], x[0][1])):
        if backend != "triton" or r["ms"] is None:
            continue
        gemm, ref, cold = by.get(("gemm", n, dtype)), by.get(("reference", n, dtype)), by.get(("triton_cold", n, dtype))
        parts = [f"n={n} {dtype}: triton {r['ms']:.2f} ms"]
        if gemm and gemm["ms"]:
            parts.append(f"{r['ms'] / gemm['ms']:.2f}x gemm")
        if cold and cold["ms"]:
            parts.append(f"cold {cold['ms'] / gemm['ms']:.2f}x gemm" if gemm and gemm["ms"] else "")
        if ref and ref["ms"]:
            parts.append(f"reference / triton {ref['ms'] / r['ms']:.2f}x")
            if ref["peak_mib"] and r["peak_mib"] is not None:
                parts.append(f"peak {100 * r['peak_mib'] / ref['peak_mib']:.1f}% of reference")
        print(", ".join(p for p in parts if p))


def plot(rows, path: Path, device_name: str, m: int):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    dtypes = sorted({r["dtype"] for r in rows})
    fig, axes = plt.subplots(1, len(dtypes), figsize=(5.5 * len(dtypes), 4.2), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        for backend in ("gemm", "reference", "triton_cold", "triton"):
            pts = sorted((r["n"], r["ms"]) for r in rows if r["dtype"] == dtype and r["backend"] == backend and r["ms"])
            if pts:
                ax.plot(*zip(*pts), marker="o", label=backend)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("n (columns)")
        ax.set_ylabel("ms (median)")
        ax.set_title(f"gram_topk {dtype}, m={m}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(device_name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
