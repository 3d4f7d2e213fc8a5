"""Sparse sweep: the sparse co-activation backend vs reference vs the fused dense cpu backend.

    python benchmarks/sparse_sweep.py                          # B = 2048, L0 ∈ {16, 64, 256}, n ∈ {4096, 16384, 65536}
    python benchmarks/sparse_sweep.py --n 16384 --l0 64        # the issue's target point
    python benchmarks/sparse_sweep.py --device cuda --B 4096   # GPU rows (torch-ops sparse path vs reference)

Inputs are TopK-like activations: every row holds exactly L0 latents with positive values,
drawn with a skewed (Zipf-like) latent frequency so that pairs repeat across rows.
k = ceil(0.005 · n(n−1)/2). Every measurement runs in a fresh process, so peak memory is
its own (resident memory above the level after the inputs were built, or CUDA
max_memory_allocated). Backends:
  sparse        gram_topk(a, k, backend="sparse") (C++ kernel on CPU when aosae._C has it)
  sparse-torch  the pure-torch sparse path (the CUDA implementation; the CPU fallback)
  reference     materialise C = aᵀa; skipped when 3·n²·4 bytes exceed --ref-limit-gb
  cpu           the fused dense C++ kernel, when aosae._C has gram_topk_cpu; skipped when
                m·n²/2 multiply-adds exceed --dense-limit-macs (minutes on a small CPU)
Every sparse row is checked against the reference's pairs where the reference ran
(`pairs`: "identical", or how many of the k (row, col) differ). Rows go to
benchmarks/results/sparse-<machine>.json and a PNG plot beside it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import machine  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
BACKENDS = ("sparse", "sparse-torch", "reference", "cpu")


def make_input(m: int, n: int, l0: int, dtype: torch.dtype, device: str, seed: int = 0) -> torch.Tensor:
    """[m, n] TopK-like activations: exactly l0 non-zeros per row, values in (0.05, 1.05],
    latent i drawn with weight ∝ 1/(i + 50)^0.8 (Gumbel top-k = sampling without replacement)."""
    g = torch.Generator().manual_seed(seed)
    logw = -0.8 * torch.log(torch.arange(n, dtype=torch.float32) + 50)
    a = torch.zeros(m, n, dtype=dtype)
    for t0 in range(0, m, 256):  # chunks keep the [rows, n] Gumbel noise small
        rows = min(256, m - t0)
        u = torch.rand(rows, n, generator=g).clamp_min_(1e-12)
        idx = torch.topk(logw - torch.log(-torch.log(u)), l0, dim=1).indices
        a[t0 : t0 + rows].scatter_(1, idx, (torch.rand(rows, l0, generator=g) + 0.05).to(dtype))
    return a.to(device)


def load_dev_extension(path: str) -> None:
    """Use a development build of the sparse kernel (a .so exposing gram_topk_sparse_cpu)
    instead of aosae._C, e.g. before the package's extension is rebuilt."""
    import importlib.util

    from aosae.ops.backends import sparse as sparse_backend

    spec = importlib.util.spec_from_file_location(Path(path).name.split(".")[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sparse_backend.cpp_module = lambda: module


def worker(args) -> None:
    """One measurement in this (fresh) process; prints one JSON row, saves the pairs."""
    import aosae
    from aosae.ops.backends import sparse as sparse_backend

    if args.ext:
        load_dev_extension(args.ext)
    device = args.device
    a = make_input(args.B, args.n, args.l0, DTYPES[args.dtype], device)
    k = aosae.k_for_fraction(args.n, 0.005)

    def warm_up_small() -> None:
        x = a[:64, :256].contiguous()
        if args.backend == "sparse-torch":
            sparse_backend.csr_topk_torch(*sparse_backend.dense_to_csr_torch(x), x.shape[1], 10, False)
        else:
            aosae.gram_topk(x, 10, backend=args.backend)

    if args.backend == "sparse-torch":
        run = lambda: sparse_backend.csr_topk_torch(  # noqa: E731
            *sparse_backend.dense_to_csr_torch(a), args.n, k, False
        )
    else:
        run = lambda: tuple(aosae.gram_topk(a, k, backend=args.backend))  # noqa: E731
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    # warm-up on a small slice first: lazy library initialisation is not the call's memory
    warm_up_small()
    # the dense CPU paths take seconds to minutes per call: their one measured call is the
    # timed one; the fast paths get a full warm-up, a measured call, then timed repetitions
    slow = args.backend in ("reference", "cpu") and not cuda
    if not slow:
        run()
    sync()
    start = time.perf_counter()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = run()
        sync()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        out, peak = machine.peak_cpu_memory_mib(run)
    times = [time.perf_counter() - start]
    reps = 1 if slow else args.reps
    for _ in range(reps - 1):
        sync()
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    torch.save([t.cpu() for t in out], args.save)
    row = {
        "backend": args.backend, "m": args.B, "n": args.n, "k": k, "l0": args.l0, "dtype": args.dtype,
        "device": device, "ms": round(1000 * statistics.median(times), 3), "peak_mib": round(peak, 1),
        "reps": reps, "machine": machine.machine_name(device), "versions": machine.versions(),
        "date": machine.today(),
    }
    if args.backend.startswith("sparse"):
        row["predicted"] = {key: round(v, 3) for key, v in sparse_backend.predicted_ms(a).items()}
    print("ROW " + json.dumps(row), flush=True)


def skip_reason(backend: str, n: int, m: int, args) -> str | None:
    if backend == "reference" and 3 * n * n * 4 > args.ref_limit_gb * 1e9:
        return f"reference needs ~{3 * n * n * 4 / 1e9:.0f} GB (> --ref-limit-gb {args.ref_limit_gb})"
    if backend == "cpu":
        if args.device != "cpu":
            return "the cpu backend runs on CPU only"
        from aosae.ops import extension as _extension

        module, why = _extension.load()
        if module is None or not hasattr(module, "gram_topk_cpu"):
            return f"aosae._C has no gram_topk_cpu ({why or 'rebuild'})"
        if m * n * n / 2 > args.dense_limit_macs:
            return f"m·n²/2 = {m * n * n / 2:.1e} multiply-adds (> --dense-limit-macs {args.dense_limit_macs:.0e})"
    return None


def compare(path: Path, ref_path: Path) -> str:
    """How a result's pairs compare with the reference's: 'identical' (same pairs in the
    same order), 'same pairs' (order differs only where fp32 rounding swaps near-equal
    scores), or how many pairs differ."""
    got, want = torch.load(path), torch.load(ref_path)
    diff = float((got[0].double() - want[0].double()).abs().max()) if got[0].numel() else 0.0
    if torch.equal(got[1], want[1]) and torch.equal(got[2], want[2]):
        return f"identical (max |dvalue| {diff:.1e})"
    same = set(zip(got[1].tolist(), got[2].tolist())) & set(zip(want[1].tolist(), want[2].tolist()))
    if len(same) == len(got[1]):
        moved = int(((got[1] != want[1]) | (got[2] != want[2])).sum())
        return f"same pairs ({moved} positions swapped by near-equal scores)"
    return f"{len(got[1]) - len(same)} of {len(got[1])} pairs differ"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for backend in BACKENDS:
        for l0 in sorted({r["l0"] for r in rows}):
            pts = sorted((r["n"], r["ms"]) for r in rows if r["backend"] == backend and r["l0"] == l0)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{backend}, L0={l0}")
    ax.set(xscale="log", yscale="log", xlabel="n (latents)", ylabel="ms per call",
           title=f"gram_topk, B={rows[0]['m']}, k=0.5% of pairs — {rows[0]['machine']}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--B", type=int, default=2048)
    parser.add_argument("--n", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--l0", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=5, help="timed calls after the warm-up (reference and cpu on CPU: 1, no full warm-up)")
    parser.add_argument("--ref-limit-gb", type=float, default=12.0)
    parser.add_argument("--dense-limit-macs", type=float, default=2e12)
    parser.add_argument("--ext", default="", help="path of a development build of the sparse kernel (.so)")
    parser.add_argument("--out", default="", help="results file (default benchmarks/results/sparse-<machine>.json)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.n, args.l0 = args.n[0], args.l0[0]
        worker(args)
        return

    name = machine.machine_name(args.device)
    out = Path(args.out) if args.out else machine.RESULTS / f"sparse-{machine.slug(name)}.json"
    rows: list[dict] = []
    tmp = Path(tempfile.mkdtemp(prefix="aosae_sparse_sweep_"))
    # the reference first, so the sparse rows can be compared with its pairs
    order = sorted(args.backends, key=lambda b: b != "reference")
    for n in args.n:
        for l0 in args.l0:
            ref_path = tmp / f"reference-{n}-{l0}.pt"
            for backend in order:
                why = skip_reason(backend, n, args.B, args)
                if why:
                    print(f"skip {backend:12s} n={n:6d} L0={l0:4d}: {why}", flush=True)
                    continue
                save = tmp / f"{backend}-{n}-{l0}.pt"
                cmd = [sys.executable, __file__, "--worker", "--backend", backend, "--n", str(n), "--l0", str(l0),
                       "--B", str(args.B), "--dtype", args.dtype, "--device", args.device,
                       "--reps", str(args.reps), "--save", str(save)] + (["--ext", args.ext] if args.ext else [])
                proc = subprocess.run(cmd, capture_output=True, text=True)
                lines = [x for x in proc.stdout.splitlines() if x.startswith("ROW ")]
                if proc.returncode or not lines:
                    print(f"FAIL {backend} n={n} L0={l0}: {proc.stderr.strip()[-600:]}", flush=True)
                    continue
                row = json.loads(lines[-1][4:])
                if backend != "reference" and ref_path.exists():
                    row["pairs"] = compare(save, ref_path)
                rows.append(row)
                machine.write_rows(out, rows)
                print(f"{backend:12s} n={n:6d} L0={l0:4d}  {row['ms']:10.2f} ms  {row['peak_mib']:8.1f} MiB  "
                      f"{row.get('pairs', '')}", flush=True)
    if rows:
        plot(rows, out.with_suffix(".png"))
        print(f"wrote {out} and {out.with_suffix('.png')}")
        ref = {(r["n"], r["l0"]): r["ms"] for r in rows if r["backend"] == "reference"}
        for r in rows:
            if r["backend"].startswith("sparse") and (r["n"], r["l0"]) in ref:
                print(f"{r['backend']:12s} n={r['n']:6d} L0={r['l0']:4d}: {ref[(r['n'], r['l0'])] / r['ms']:8.1f}x "
                      f"faster than reference, pairs {r.get('pairs')}")


if __name__ == "__main__":
    main()
