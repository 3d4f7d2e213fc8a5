"""The report of benchmarks/gpu_suite.py: the targets table printed at the end, and the plot."""
from __future__ import annotations

import itertools
from pathlib import Path

from gpu_checks import DTYPES


def find(doc, **want):
    return next((r for r in doc["rows"] if "skipped" not in r and all(r.get(k) == v for k, v in want.items())), None)


def summarize(doc, cfg):
    rows = doc["rows"]
    bad = [r for r in rows if r.get("ok") is False]
    print(f"\n{len(rows)} rows, {sum('skipped' in r for r in rows)} skipped, "
          f"{sum(r.get('ok') is True for r in rows)} checks passed, {len(bad)} failed")
    for r in bad:
        print("  FAILED", {k: r.get(k) for k in ("section", "backend", "n", "dtype", "similarity", "input", "d_sae")})
    tri = find(doc, section="triton", backend="triton", n=cfg.t_tri_n, dtype="bf16") or {}
    step = find(doc, section="train_step", backend="ratio", activation="topk", d_sae=cfg.t_d_sae) or {}
    # the target is gram_topk_sparse's forward + backward; backend="sparse" on dense input beside it
    sp = {(name, phase): find(doc, section="sparse", backend=name, phase=phase, n=cfg.t_sparse_n, L0=cfg.t_l0,
                              dtype="bf16") or {}
          for name, phase in (("gram_topk_sparse", "fwd+bwd"), ("gram_topk_sparse", "fwd"), ("sparse", "fwd"),
                              ("sparse", "fwd+bwd"))}
    print(f"{'target':52s} {'measured':>10s} {'goal':>8s}  verdict")
    for name, value, goal, unit in [
        (f"triton warm ÷ half-GEMM, n {cfg.t_tri_n} bf16", tri.get("x_half_gemm"), 1.3, "x"),
        *[(f"{name} {phase}, B {cfg.B} n {cfg.t_sparse_n} L0 {cfg.t_l0} bf16", r.get("ms_median"), 2.0, "ms")
          for (name, phase), r in sp.items()],
            (f"TopK step with ÷ without, d_sae {cfg.t_d_sae}", step.get("ratio_median"), 1.05, "x")]:
        verdict = "not measured" if value is None else ("met" if value <= goal else "missed")
        print(f"{name:52s} {'-' if value is None else f'{value:.3f}{unit}':>10s} {'≤' + str(goal) + unit:>8s}  {verdict}")


def plot(doc, path: Path, cfg):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [r for r in doc["rows"] if "skipped" not in r]
    fig, ax = plt.subplots(1, 3, figsize=(17, 4.5))
    for i, (dtype, (name, style)) in enumerate(itertools.product(DTYPES, (("triton", "-"), ("triton_cold", ":"),
                                                                          ("half_gemm_floor", "--")))):
        pts = sorted((r["n"], r["ms_median"]) for r in rows if r["section"] in ("triton", "big_n")
                     and r.get("backend") == name and r.get("dtype") == dtype)
        if pts:
            ax[0].plot(*zip(*pts), style, marker="o", color=f"C{i // 3}", label=f"{name} {dtype}")
    for i, (name, (ph, style)) in enumerate(itertools.product(("sparse", "gram_topk_sparse", "reference"),
                                                              (("fwd", "-"), ("fwd+bwd", "--")))):
        pts = sorted((r["n"], r["ms_median"]) for r in rows if r["section"] == "sparse" and r.get("backend") == name
                     and r.get("phase") == ph and r.get("L0") == cfg.t_l0 and r.get("dtype") == "bf16")
        if pts:
            ax[1].plot(*zip(*pts), style, marker="o", color=f"C{i // 2}", label=f"{name} {ph}")
    for i, act in enumerate(("relu", "topk")):
        sel = sorted((r for r in rows if r.get("backend") == "ratio" and r.get("activation") == act), key=lambda r: r["d_sae"])
        if sel:
            med = [r["ratio_median"] for r in sel]
            err = [[m - r["ratio_min"] for m, r in zip(med, sel)], [r["ratio_max"] - m for m, r in zip(med, sel)]]
            ax[2].errorbar([r["d_sae"] for r in sel], med, yerr=err, marker="o", capsize=3, label=act, color=f"C{i}")
    ax[1].axhline(2.0, color="grey", lw=0.8)
    ax[2].axhline(1.05, color="grey", lw=0.8)
    for axis, title, xl, yl in zip(ax, (f"gram_topk dense, B={cfg.B}", f"sparse path, B={cfg.B}, L0={cfg.t_l0}, bf16",
                                        "step with ÷ without penalty"), ("n", "n", "d_sae"),
                                   ("ms (median)", "ms (median)", "ratio (median, min-max)")):
        axis.set(title=title, xlabel=xl, ylabel=yl)
        axis.set_xscale("log", base=2)
        if axis is not ax[2]:
            axis.set_yscale("log")
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
        axis.grid(True, which="both", alpha=0.3)
    fig.suptitle(doc["header"]["machine"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
