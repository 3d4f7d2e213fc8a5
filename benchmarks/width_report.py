"""The width sweep's report: its plot and the markdown table of a results file
(benchmarks/width_sweep.py writes the rows; `python benchmarks/width_sweep.py --table JSON`)."""
from __future__ import annotations

import json
from pathlib import Path


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in dict.fromkeys(r["arm"] for r in rows):
        sel = sorted((r for r in rows if r["arm"] == name and r.get("median_s")), key=lambda r: r["d_sae"])
        if not sel:
            continue
        xs = [r["d_sae"] for r in sel]
        med = [r["median_s"] for r in sel]
        err = [[m - r["q1_s"] for m, r in zip(med, sel)], [r["q3_s"] - m for m, r in zip(med, sel)]]
        ax.errorbar(xs, med, yerr=err, marker="o", capsize=3, label=name, ls="--" if name.startswith("floor") else "-")
    ax.set(xscale="log", yscale="log", xlabel="d_sae", ylabel="step time, s (median, IQR)")
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=7)
    seen = {}
    for r in rows:
        for label, v in r["ratios"].items():
            seen.setdefault(label, {})[r["d_sae"]] = v
    for label, by_width in seen.items():
        if "floor" in label:
            continue
        xs = sorted(by_width)
        ys = [by_width[w]["median_s"] for w in xs]
        bx.plot(xs, ys, marker="o", label=label)
    for y in (1.0, 1.05):
        bx.axhline(y, ls=":", c="grey", lw=0.8)
    bx.set(xlabel="d_sae", ylabel="ratio of step times (median)")
    bx.set_xscale("log", base=2)
    bx.legend(fontsize=7)
    shared = any(r.get("shared_machine") for r in rows)
    shapes = {}
    for r in rows:
        shapes.setdefault((r["batch"], r["d_in"]), set()).add(r["d_sae"])
    where = "; ".join(f"B {b}, d_in {d} at d_sae {', '.join(str(w) for w in sorted(ws))}" for (b, d), ws in shapes.items())
    fig.suptitle(f"{rows[0]['machine']}, {rows[0]['threads']} threads, TopK k {rows[0]['k']}, fp32, AdamW\n{where}"
                 + (" (machine shared during the run)" if shared else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(path: str) -> str:
    """A markdown table of a results file (the README's and NOTES's numbers)."""
    rows = json.loads(Path(path).read_text())
    by = {}
    for r in rows:
        by.setdefault(r["d_sae"], {})[r["arm"]] = r

    def cell(r, unit=1.0):
        if not r or not r.get("median_s"):
            return "–" if not r else r["status"].split(":")[0]
        return f"{r['median_s'] * unit:.2f} [{r['q1_s'] * unit:.2f}, {r['q3_s'] * unit:.2f}]"

    def ratio(w, label):
        v = next(iter(by[w].values()))["ratios"].get(label)
        if not v:
            return "–"
        return f"{v['median_s']:.2f}×" + (f" [{v['q1_s']:.2f}, {v['q3_s']:.2f}]" if v["per_round"] else " (medians)")

    def mib(r):
        return f"{r['peak_rss_mib'] / 1024:.1f}" if r and r.get("peak_rss_mib") else "–"

    lines = ["| d_sae | B, d_in | aosae TopK s | sparsify s | aosae ÷ sparsify | TopK + penalty ÷ TopK | BatchTopK s "
             "| BatchTopK + penalty ÷ BatchTopK | floor s (GFLOP/s) | peak GiB aosae / sparsify / +penalty |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for w in sorted(by):
        a = by[w]
        any_row = next(iter(a.values()))
        floor = a.get("floor-encoder-gemm")
        floor_cell = f"{floor['median_s']:.3g} ({floor['gemm_gflops']:.0f})" if floor and floor.get("median_s") else "–"
        lines.append(f"| {w} | {any_row['batch']}, {any_row['d_in']} | {cell(a.get('aosae-topk'))} | {cell(a.get('sparsify-topk'))} "
                     f"| {ratio(w, 'aosae-topk / sparsify-topk')} | {ratio(w, 'topk: with / without penalty')} "
                     f"| {cell(a.get('aosae-batchtopk'))} | {ratio(w, 'batchtopk: with / without penalty')} | {floor_cell} "
                     f"| {mib(a.get('aosae-topk'))} / {mib(a.get('sparsify-topk'))} / {mib(a.get('aosae-topk+penalty'))} |")
    return "\n".join(lines)
