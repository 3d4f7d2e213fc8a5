"""CPU sweep: reference vs the fused cpu backend vs the half-GEMM floor.

    python benchmarks/cpu_sweep.py                      # n = 1024 … 16384, B = 2048, fp32
    python benchmarks/cpu_sweep.py --n 8192 --reps 5    # the issue's target point only

Every (backend, n) runs in a fresh process so its peak memory is its own. Rows go to
benchmarks/results/<machine>.json (backend, m, n, k, dtype, ms, peak_mib, machine,
versions, date) and a plot beside it; a table is printed. `gemm_half` is the time of
torch.mm(aᵀ, a) ÷ 2: the work the fused kernel cannot avoid (half the Gram matrix).
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
import machine  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def make_input(m: int, n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Dense SAE-like activations: ReLU of shifted Gaussians, ~30% non-zero."""
    g = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(m, n, generator=g) - 0.5).to(dtype)


def measure(backend: str, m: int, n: int, dtype: str, fraction: float, reps: int) -> dict:
    import aosae

    a = make_input(m, n, DTYPES[dtype])
    k = aosae.k_for_fraction(n, fraction)
    if backend == "gemm_half":
        x = a.float()
        run = lambda: torch.mm(x.t(), x)  # noqa: E731
    else:
        run = lambda: aosae.gram_topk(a, k, backend=backend)  # noqa: E731
    # warm up on a small input (imports, BLAS and allocator set-up), then measure the
    # first call at full size: peak memory is counted above the input's own
    small = make_input(min(m, 256), min(n, 512), DTYPES[dtype])
    torch.mm(small.float().t(), small.float())
    aosae.gram_topk(small, min(k, 100), backend="reference" if backend == "gemm_half" else backend)
    _, peak = machine.peak_cpu_memory_mib(run)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    ms = 1000 * statistics.median(times)
    if backend == "gemm_half":
        ms /= 2
    return {"backend": backend, "m": m, "n": n, "k": k, "dtype": dtype, "ms": round(ms, 2),
            "peak_mib": round(peak, 1), "reps": reps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--m", type=int, default=2048, help="batch (rows of a)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--fraction", type=float, default=0.005)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--backends", nargs="+", default=["reference", "cpu", "gemm_half"])
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default: results/<machine>.json)")
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        backend, m, n, dtype, fraction, reps = args.worker
        print(json.dumps(measure(backend, int(m), int(n), dtype, float(fraction), int(reps))))
        return

    name = machine.machine_name("cpu")
    meta = {"machine": name, "versions": machine.versions(), "date": machine.today(),
            "threads": torch.get_num_threads()}
    rows = []
    for n in args.n:
        for backend in args.backends:
            cmd = [sys.executable, __file__, "--worker", backend, str(args.m), str(n), args.dtype,
                   str(args.fraction), str(args.reps)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{backend} n={n} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            row = {**json.loads(out.stdout.strip().splitlines()[-1]), **meta}
            rows.append(row)
            print(f"{backend:>10} n={n:>6} k={row['k']:>9} {row['ms']:>10.1f} ms {row['peak_mib']:>9.1f} MiB", flush=True)
    path = args.out or machine.RESULTS / f"cpu-{machine.slug(name)}.json"
    machine.write_rows(path, rows)
    print(f"wrote {path}")
    print(table(rows))
    try:
        plot(rows, path.with_suffix(".png"))
        print(f"wrote {path.with_suffix('.png')}")
    except ImportError:
        print("matplotlib not installed: no plot")


def table(rows: list[dict]) -> str:
    """Markdown table: one line per n with the ratios the targets are stated in."""
    by = {(r["backend"], r["n"]): r for r in rows}
    lines = ["| n | k | reference ms | cpu ms | half-GEMM ms | speed-up vs reference | cpu ÷ half-GEMM | reference MiB | cpu MiB | memory ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for n in sorted({r["n"] for r in rows}):
        ref, cpu, gemm = by.get(("reference", n)), by.get(("cpu", n)), by.get(("gemm_half", n))
        if not (cpu and ref and gemm):
            continue
        lines.append(
            f"| {n} | {cpu['k']} | {ref['ms']:.0f} | {cpu['ms']:.0f} | {gemm['ms']:.0f} | "
            f"{ref['ms'] / cpu['ms']:.2f}× | {cpu['ms'] / gemm['ms']:.2f}× | {ref['peak_mib']:.0f} | "
            f"{cpu['peak_mib']:.0f} | {ref['peak_mib'] / max(cpu['peak_mib'], 0.1):.0f}× |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for backend, style in (("reference", "o-"), ("cpu", "s-"), ("gemm_half", "k--")):
        pts = sorted((r["n"], r["ms"], r["peak_mib"]) for r in rows if r["backend"] == backend)
        if not pts:
            continue
        ns, ms, mib = zip(*pts)
        label = "half-GEMM floor (mm ÷ 2)" if backend == "gemm_half" else backend
        ax_t.loglog(ns, ms, style, label=label, base=2)
        if backend != "gemm_half":
            ax_m.loglog(ns, mib, style, label=backend, base=2)
    ax_t.set(xlabel="n (columns / latents)", ylabel="ms per call", title=f"gram_topk, B = {rows[0]['m']}, fraction 0.005")
    ax_m.set(xlabel="n (columns / latents)", ylabel="peak extra memory (MiB)", title="peak memory above input")
    for ax in (ax_t, ax_m):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(rows[0]["machine"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
