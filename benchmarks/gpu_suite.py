"""Checks and times everything on a GPU in one call: gram_topk's backends, the sparse path, the
SAE training step, the Triton kernel against cuBLAS (benchmarks/NOTES.md, "First GPU run").

    python benchmarks/gpu_suite.py --out-dir $OUT     # H100/H200: ~8 min (--budget-s 480)
    TRITON_INTERPRET=1 python benchmarks/gpu_suite.py --device cpu --quick --out-dir /tmp/gs  # dry run

Sections, most important first (--sections picks some): 1 correctness of reference, triton, sparse and
gram_topk_sparse (pairs, |values|, gradients) vs the reference where it fits, and of every result vs
float64 (sampled pairs, and a slab of rows where nothing beats the k-th |score| unless returned);
2 sparse: backend="sparse" on dense ReLU-like and gram_topk_sparse on TopK [B, L0] inputs, bf16 and
fp32, fwd and fwd+bwd; 3 train_step with / without the penalty; 4 triton warm (hint from ANOTHER batch) / cold vs
torch.mm(aᵀ, a), its half (the floor) and the reference; 5 big_n: section 4 at n 65536 / 131072 (whose
triton results are checked there); 6 sparse_coding: the sparse SAE step's Triton primitives (decode, W
gradient, value gradient) against float64, torch and their memory floor, then the TopK step built on
aosae.ops.sparse_coding against sparsify's SparseCoder and the trainer's step (run after section 3;
its code, and the trainer's objective, in gpu_sparse_step.py).
Timing: arms alternate order every round, same warm-up and rounds; median, min/max, IQR; peak_mib =
max_memory_allocated above the level before the call. Rows reach the JSON as they complete; once
--budget-s is spent no row starts and the skipped ones say why.
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

START = time.monotonic()
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_gram_topk import REPO, import_aosae, peak_extra_mib, skip_reason as reason  # noqa: E402  (stdlib only at import time)

from gpu_checks import DTYPES, attempt, call, checked, gaussian, ref_skip, topk_input  # noqa: E402
from gpu_report import plot, summarize  # noqa: E402
from gpu_sparse_step import coding_rows, coding_step_rows, make_objective, summarize_coding  # noqa: E402

import torch  # noqa: E402  (does not import triton: TRITON_INTERPRET can still be set in main())

aosae = None  # imported in main(), after TRITON_INTERPRET is set


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: tiny shapes through Triton's interpreter (a dry run of every code path)")
    p.add_argument("--quick", action="store_true", help="fewer sizes and rounds")
    p.add_argument("--out-dir", type=Path, default=None, help="default benchmarks/results (cuda), a temp dir (cpu)")
    p.add_argument("--budget-s", type=float, default=480.0, help="no row starts after this many seconds")
    p.add_argument("--max-row-s", type=float, default=60.0, help="a row's timed rounds are cut to fit this")
    p.add_argument("--sections", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6], choices=range(1, 7))
    p.add_argument("--reps", type=int, default=None, help="timed rounds per row (after the warm-up)")
    return p.parse_args(argv)


def config(args) -> SimpleNamespace:
    if args.device == "cpu":  # tiny: runs every code path, the numbers mean nothing
        c = dict(B=32, check_n=[64, 128], sparse_n=[64, 128], l0=[4, 8], check_l0=8, d_sae=[128, 256], d_in=64,
                 tri_n=[64], big_n=[128], ref_max_n=64, gemm_max_n=64, warmup=1, reps=2, step_warmup=1,
                 step_rounds=2, slab=16, sample=256, top_k=8, t_tri_n=64, t_sparse_n=128, t_d_sae=256,
                 coding_n=[128], coding_dtypes=["fp32", "bf16"], coding_d_sae=[256])
    else:
        q = [] if args.quick else [131072]
        c = dict(B=4096, check_n=[4096, 16384, 65536] + q, sparse_n=[16384, 65536] + q,
                 l0=[64] if args.quick else [32, 64, 128], check_l0=64, d_sae=[16384, 65536], d_in=2304,
                 tri_n=[4096, 16384], big_n=[65536] + q, ref_max_n=16384, gemm_max_n=65536, warmup=2,
                 reps=4 if args.quick else 10, step_warmup=3, step_rounds=5 if args.quick else 10, slab=256,
                 sample=4096, top_k=64, t_tri_n=16384, t_sparse_n=65536, t_d_sae=65536,
                 coding_n=[65536] if args.quick else [16384, 65536, 262144], coding_dtypes=["fp32", "bf16"],
                 coding_d_sae=[16384, 65536])
    if args.reps:
        c.update(reps=args.reps, step_rounds=args.reps)
    return SimpleNamespace(**c, t_l0=c["top_k"], device=args.device, cuda=args.device == "cuda")


def stats(ms: list[float]) -> dict:
    q = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else [ms[0]] * 3
    return dict(ms_median=statistics.median(ms), ms_min=min(ms), ms_max=max(ms), ms_q1=q[0], ms_q3=q[2], reps=len(ms))


class Suite:
    """The rows, the results file, the time budget, and the timing helpers."""

    def __init__(self, args, cfg, header, path: Path):
        self.cfg, self.args, self.path, self.last_plot = cfg, args, path, 0.0
        self.doc = {"header": header, "rows": []}

    def left(self) -> float:
        return self.args.budget_s - (time.monotonic() - START)

    def save(self, plot_now=False):
        self.doc["header"]["elapsed_s"] = round(time.monotonic() - START, 1)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1, default=str) + "\n")
        os.replace(tmp, self.path)  # a kill mid-write never leaves half a file
        if plot_now or time.monotonic() - self.last_plot > 20:  # a plot costs ~0.5 s: not after every row
            plot(self.doc, self.path.with_suffix(".png"), self.cfg)
            self.last_plot = time.monotonic()

    def add(self, row: dict):
        row["t_s"] = round(time.monotonic() - START, 1)
        self.doc["rows"].append(row)
        self.save()
        keys = [f"{k}={row[k]}" for k in ("op", "backend", "phase", "activation", "n", "d_sae", "L0", "dtype", "similarity",
                                          "input", "ok", "ratio_median", "x_floor", "skipped") if row.get(k) is not None]
        ms = f"{row['ms_median']:9.3f} ms [{row['ms_min']:.3f}, {row['ms_max']:.3f}] " if "ms_median" in row else ""
        print(f"[{row['t_s']:6.1f}s] {row['section']:11s} {ms}{' '.join(keys)}", flush=True)

    def run(self, section: str, keys: dict, fn):
        """fn() -> partial rows, each merged with keys; an exception or a spent budget becomes a skipped row."""
        if self.left() <= 0:
            return self.add({"section": section, **keys, "skipped": f"budget {self.args.budget_s:.0f} s spent"})
        self.doc["header"]["in_progress"] = f"{section} {keys}"  # names the row a kill interrupted
        self.save()
        try:
            for row in fn():
                self.add({"section": section, **keys, **row})
        except Exception as err:  # OOM, compile errors, a failed check: record it and go on
            self.add({"section": section, **keys, "skipped": reason(err)})
        gc.collect()
        if self.cfg.cuda:
            torch.cuda.empty_cache()

    def clock(self, fn) -> float:
        if not self.cfg.cuda:
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        torch.cuda.synchronize()  # nothing queued before counts
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    def peak(self, fn):
        mib = peak_extra_mib(fn, self.cfg.device)
        return None if mib is None else round(mib, 1)

    def time_arms(self, arms: dict, warmup=None, reps=None) -> dict:
        """Rounds over all arms (order flipped each round, so drift hits every arm alike), then one
        peak-memory call per arm. The timed rounds are cut to fit --max-row-s and the budget."""
        warmup = self.cfg.warmup if warmup is None else warmup
        total, names, r = warmup + (self.cfg.reps if reps is None else reps), list(arms), 0
        times = {name: [] for name in names}
        t_row, allow = time.monotonic(), max(0.0, min(self.left(), self.args.max_row_s))
        while r < total:
            t = time.monotonic()
            for name in (names if r % 2 == 0 else names[::-1]):
                ms = self.clock(arms[name])
                if r >= warmup:
                    times[name].append(ms)
            r, spent = r + 1, time.monotonic() - t_row
            if r <= warmup and (r == warmup or spent > allow):  # warm-up over (or too slow to finish): size the rest
                warmup, total = r, min(total, r + max(1, int((allow - spent) / max(time.monotonic() - t, 1e-6))))
        return {name: {**stats(times[name]), "peak_mib": self.peak(arms[name]), "raw_ms": times[name]} for name in names}


# ---- sections ---------------------------------------------------------------------------------

def check_one(cfg, ctx, name, n, k, dtype, sim, inp, fits):
    if "a" not in ctx:  # one input per group, shared by its backends
        ctx["sp"] = topk_input(cfg, n, cfg.check_l0, dtype, seed=n) if inp == "topk" else None
        ctx["a"] = ctx["sp"][2] if inp == "topk" else gaussian(cfg, n, dtype, seed=n)
    # the reference's gradient through the product, whatever path the others take (an independent check of expand)
    got, g = call(name, ctx["a"], k, sim, grad=fits, sparse=ctx["sp"], backward="product" if name == "reference" else None)
    if name == "reference":
        ctx.update(ref=got, g_ref=g)
        return [checked(cfg, ctx["a"], got, None, sim == "cosine")]
    idx = ctx["sp"][0] if name == "gram_topk_sparse" else None
    return [checked(cfg, ctx["a"], got, ctx.get("ref"), sim == "cosine", g=g, g_ref=ctx.get("g_ref"), dtype=dtype, idx=idx)]


def sparse_rows(S, n, k, l0, dtype):
    cfg = S.cfg
    idx, vals, a = topk_input(cfg, n, l0, dtype, seed=l0)
    ref, why = (None, ref_skip(cfg, n)) if ref_skip(cfg, n) else attempt(lambda: call("reference", a, k)[0])
    checks = {name: attempt(lambda name=name: checked(cfg, a, call(name, a, k, sparse=(idx, vals))[0], ref))
              for name in ["sparse", "gram_topk_sparse"] + ([] if ref is None else ["reference"])}
    from aosae.ops.backward import backward_path  # (aosae is imported in main(), after TRITON_INTERPRET is set)

    # which gradient the dense input's backward takes (expand or product); the other one timed beside it
    # where the product is affordable (0.45-7.9 s a call at n >= 65536 on the first H200 run)
    path, _ = attempt(lambda: backward_path(a, *call("sparse", a, k)[0][1:]))
    phases = ("fwd", "fwd+bwd") + (("fwd+bwd product",) if path not in (None, "product") and n <= 16384 else ())
    arms = {(name, ph): (lambda name=name, ph=ph: call(name, a, k, grad=ph != "fwd", sparse=(idx, vals),
                                                       backward="product" if ph == "fwd+bwd product" else None))
            for name in checks for ph in phases if checks[name][0] is not None
            and (ph != "fwd+bwd product" or name == "sparse")}
    res = S.time_arms(arms)
    out = [dict(backend=name, phase=ph, **checks[name][0], **res[name, ph],
                **({"dense_input_backward": "product" if ph == "fwd+bwd product" else path}
                   if name != "gram_topk_sparse" and ph != "fwd" else {}))
           for name, ph in arms]
    for r in out:
        if ("reference", r["phase"]) in res:
            r["x_faster_than_reference"] = res["reference", r["phase"]]["ms_median"] / r["ms_median"]
    skipped = {name: c[1] for name, c in checks.items() if c[1]} | ({"reference": why} if why else {})
    return out + [dict(backend=name, skipped=w) for name, w in skipped.items()]


def step_rows(S, d_sae, act):
    cfg = S.cfg
    g = torch.Generator(device=cfg.device).manual_seed(0)
    x = torch.randn(4 * cfg.B, cfg.d_in, generator=g, device=cfg.device)
    x = x / x.norm(dim=1).mean()  # scaled like `aosae train`
    objs = {arm: make_objective(cfg, d_sae, act, x, arm == "with") for arm in ("with", "without")}
    # check: the step's penalty against the op on the step's own latents (triton where the reference cannot fit)
    xs, k = x[: min(512, cfg.B)], aosae.k_for_fraction(d_sae, 0.005)
    losses = objs["with"].losses(xs)
    checker = "triton" if cfg.cuda and ref_skip(cfg, d_sae) else "reference"
    want = float(aosae.gram_topk(losses.latents.detach().float(), k, backend=checker).values.abs().sum()) / xs.shape[0]
    gap = abs(float(losses.penalty.detach()) - want) / max(abs(want), 1e-30)
    del losses
    total = cfg.step_warmup + cfg.step_rounds + 2
    order = torch.randint(0, x.shape[0], (total, cfg.B), generator=g, device=cfg.device)
    cursor, last = {"with": 0, "without": 0}, {}

    def step(arm):  # both arms see the same sequence of batches
        losses = objs[arm].losses(x[order[cursor[arm] % total]])
        objs[arm].optimizer_step(losses.loss)
        cursor[arm] += 1
        last[arm] = losses.latents.detach()

    res = S.time_arms({arm: (lambda arm=arm: step(arm)) for arm in objs}, cfg.step_warmup, cfg.step_rounds)
    ratio = [w / o for w, o in zip(res["with"]["raw_ms"], res["without"]["raw_ms"])]
    common = dict(l0=float((last["with"] != 0).sum(1).float().mean()), check_rel_gap=gap, checker=checker, ok=gap <= 1e-3)
    return [dict(backend=f"{arm} penalty", **common, **res[arm]) for arm in objs] + [dict(
        backend="ratio", **common, ratio_median=statistics.median(ratio), ratio_min=min(ratio), ratio_max=max(ratio),
        ratio_q1=stats(ratio)["ms_q1"], ratio_q3=stats(ratio)["ms_q3"], raw=ratio)]


def triton_rows(S, n, k, dtype):
    from aosae.ops.backends import triton_driver

    cfg = S.cfg
    hint = float(call("triton", gaussian(cfg, n, dtype, seed=1), k)[0][0].abs()[-1])  # from another batch
    a = gaussian(cfg, n, dtype, seed=2)
    ref, why = (None, ref_skip(cfg, n)) if ref_skip(cfg, n) else attempt(lambda: call("reference", a, k)[0])
    arms, out, got = {}, [], {}
    for name, h in (("triton", hint), ("triton_cold", None)):
        got[name] = call("triton", a, k, hint=h)[0]
        info = {key: triton_driver.last_call_info.get(key) for key in ("passes", "stages", "candidates", "threshold")}
        out.append(dict(backend=name, hint=h, **info, **checked(cfg, a, got[name], ref)))
        arms[name] = lambda h=h: call("triton", a, k, hint=h)
    out[0]["warm_equals_cold"] = all(torch.equal(x, y) for x, y in zip(got["triton"], got["triton_cold"]))
    if n <= cfg.gemm_max_n:
        arms["gemm"] = lambda: torch.mm(a.t(), a)
    if ref is not None:
        arms["reference"] = lambda: call("reference", a, k)
    del got, ref
    res = S.time_arms(arms)
    for r in out:
        r.update(res[r["backend"]])
    if "gemm" in res:
        floor = {key: res["gemm"][key] / 2 for key in ("ms_median", "ms_min", "ms_max", "ms_q1", "ms_q3")}
        for r in out:
            r["x_half_gemm"] = r["ms_median"] / floor["ms_median"]
        out += [dict(backend="gemm", **res["gemm"]), dict(backend="half_gemm_floor", **floor)]
    else:
        out.append(dict(backend="gemm", skipped=f"full GEMM not timed above n = {cfg.gemm_max_n}"))
    return out + [dict(backend="reference", skipped=why) if why else dict(backend="reference", **res["reference"])]


def plan(S):
    """(section number, section, keys, fn) of every row, most important first; fn() -> partial rows."""
    cfg, kf = S.cfg, lambda n: aosae.k_for_fraction(n, 0.005)
    for n in cfg.check_n:
        fits = n <= cfg.ref_max_n
        for dtype, sim, inp in itertools.product(DTYPES if fits else ("bf16",), ("dot", "cosine") if fits else ("dot",),
                                                 ("gaussian", "topk") if fits else ("topk",)):
            ctx = {}  # the group's input and reference, shared by its backends
            for name in (["reference", "triton"] if fits else []) + (["sparse", "gram_topk_sparse"] if inp == "topk" else []):
                yield 1, "correctness", dict(backend=name, n=n, B=cfg.B, k=kf(n), dtype=dtype, similarity=sim, input=inp,
                                             L0=cfg.check_l0 if inp == "topk" else None), \
                    partial(check_one, cfg, ctx, name, n, kf(n), dtype, sim, inp, fits)
    for dtype, n, l0 in itertools.product(("bf16", "fp32"), cfg.sparse_n, cfg.l0):  # bf16: what training feeds on GPU
        yield 2, "sparse", dict(n=n, B=cfg.B, L0=l0, k=kf(n), dtype=dtype, similarity="dot"), \
            partial(sparse_rows, S, n, kf(n), l0, dtype)
    for d_sae, act in itertools.product(cfg.d_sae, ("topk", "relu")):
        yield 3, "train_step", dict(d_sae=d_sae, activation=act, B=cfg.B, d_in=cfg.d_in, top_k=cfg.top_k,
                                    dtype="bf16-autocast"), partial(step_rows, S, d_sae, act)
    for dtype, n in itertools.product(cfg.coding_dtypes, cfg.coding_n):  # before 4 and 5: never run on hardware yet
        yield 6, "sparse_coding", dict(n=n, B=cfg.B, d_in=cfg.d_in, top_k=cfg.top_k, dtype=dtype), \
            partial(coding_rows, S, n, dtype)
    for d_sae in cfg.coding_d_sae:
        yield 6, "sparse_step", dict(d_sae=d_sae, activation="topk", B=cfg.B, d_in=cfg.d_in, top_k=cfg.top_k,
                                     dtype="bf16-autocast" if cfg.cuda else "fp32"), partial(coding_step_rows, S, d_sae)
    for section, number, dtypes, sizes in (("triton", 4, DTYPES, cfg.tri_n), ("big_n", 5, ("bf16",), cfg.big_n)):
        for dtype, n in itertools.product(dtypes, sizes):
            yield number, section, dict(n=n, B=cfg.B, k=kf(n), dtype=dtype, similarity="dot", input="gaussian"), \
                partial(triton_rows, S, n, kf(n), dtype)


def main(argv=None) -> int:
    global aosae
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
        os.environ["AOSAE_SPARSE_TRITON"] = "1"  # the sparse path takes the GPU's Triton route, interpreted
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here; use --device cpu --quick for a dry run", file=sys.stderr)
        return 2
    aosae = import_aosae()
    import machine  # benchmarks/machine.py: needs aosae importable first

    cfg, name = config(args), machine.machine_name(args.device)
    header = dict(machine=name, device=args.device, versions=machine.versions(), date=machine.today(),
                  utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), command=" ".join([sys.executable] + sys.argv),
                  budget_s=args.budget_s, config=vars(cfg), allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    out_dir = args.out_dir or (REPO / "benchmarks" / "results" if args.device == "cuda"
                               else Path(tempfile.gettempdir()) / "aosae-gpu-suite-dry-run")
    out_dir.mkdir(parents=True, exist_ok=True)
    S = Suite(args, cfg, header, out_dir / f"gpu-suite-{machine.slug(name)}{'-quick' if args.quick else ''}.json")
    current = None
    for number, section, keys, fn in plan(S):
        if number in args.sections:
            if section != current:
                S.save(plot_now=current is not None)  # a section's plot as soon as it is done
                current = section
            S.run(section, keys, fn)
    S.doc["header"].pop("in_progress", None)
    S.doc["header"]["finished"] = True
    S.save(plot_now=True)
    print(f"wrote {S.path} and {S.path.with_suffix('.png')}")
    summarize(S.doc, cfg)
    summarize_coding(S.doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
