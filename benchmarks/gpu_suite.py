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
aosae.ops.sparse_coding against sparsify's SparseCoder and the trainer's step (run after section 3).
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

from gpu_checks import DT, DTYPES, call, checked, coding_check, coding_latents, gaussian, ref_skip, topk_input  # noqa: E402
from gpu_report import plot, summarize  # noqa: E402

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


def attempt(fn):
    """(fn(), None), or (None, why) when it raises: one failing arm must not cost the others of its row."""
    try:
        return fn(), None
    except Exception as err:
        return None, reason(err)


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
    got, g = call(name, ctx["a"], k, sim, grad=fits, sparse=ctx["sp"])
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
    arms = {(name, ph): (lambda name=name, ph=ph: call(name, a, k, grad=ph == "fwd+bwd", sparse=(idx, vals)))
            for name in checks for ph in ("fwd", "fwd+bwd") if checks[name][0] is not None}
    res = S.time_arms(arms)
    out = [dict(backend=name, phase=ph, **checks[name][0], **res[name, ph]) for name, ph in arms]
    for r in out if ("reference", "fwd") in res else ():
        r["x_faster_than_reference"] = res["reference", r["phase"]]["ms_median"] / r["ms_median"]
    skipped = {name: c[1] for name, c in checks.items() if c[1]} | ({"reference": why} if why else {})
    return out + [dict(backend=name, skipped=w) for name, w in skipped.items()]


def make_objective(cfg, d_sae, activation, x, penalty: bool):
    from aosae.nn.loss import TopKOrthoLoss
    from aosae.nn.sae import SparseAutoencoder
    from aosae.nn.tau import AdaptiveTau
    from aosae.training.optimizer import make_optimizer
    from aosae.training.step import SAEObjective

    torch.manual_seed(0)  # both arms start from the same weights
    with torch.device(cfg.device):  # initialised on the GPU: 151 M weights at d_sae 65536 take seconds on the CPU
        sae = SparseAutoencoder.from_dims(cfg.d_in, d_sae, activation=activation,
                                          top_k=cfg.top_k if activation in ("topk", "batchtopk") else None)
    sae.init_b_dec_(x[:4096], method="mean")
    if activation == "relu":  # lower b_enc: each latent fires on ~top_k/n of the tokens (as benchmarks/train_step.py)
        with torch.no_grad():
            pre = sae.pre_activations(x[:2048])
            sae.b_enc.sub_(pre.topk(max(1, round(pre.shape[0] * cfg.top_k / d_sae)), dim=0).values[-1])
    opt = make_optimizer(sae.parameters(), 4e-4)  # the trainer's
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return SAEObjective(sae, opt, sched, 0.04, TopKOrthoLoss(0.005) if penalty else None, AdaptiveTau())


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


def copy_gbps(S) -> float:
    """Device-to-device copy bandwidth, (read + write bytes) ÷ time, median of 5: what a memory-bound
    kernel can reach here (the floors of section 6 divide by it). Measured once per run."""
    if "copy_gbps" not in S.doc["header"]:
        src = torch.ones((1 << 28) if S.cfg.cuda else (1 << 22), device=S.cfg.device)  # 1 GiB / 16 MiB fp32
        dst = torch.empty_like(src)
        ms = [S.clock(lambda: dst.copy_(src)) for _ in range(7)][2:]
        S.doc["header"]["copy_gbps"] = 2 * src.numel() * 4 / statistics.median(ms) / 1e6
        del src, dst
    return S.doc["header"]["copy_gbps"]


def coding_rows(S, n, dtype):
    """The three gathers of a TopK step at width n (aosae.ops.backends.sparse_coding_triton): decode
    (segments = tokens, table W_dec [n, d]), W_dec's gradient (segments = latents, ragged: table
    ∂L/∂x̂ [B, d]) and the values' gradient (gathered_dot). Each against float64 (error within the
    fp32 summation bound), against what torch offers (embedding_bag; a gathered product), and against
    its floor: bytes ÷ copy bandwidth, with every gathered row read from memory (floor_ms) or each
    distinct row once (floor_unique_ms: the most an L2 can save)."""
    import torch.nn.functional as F

    from aosae.ops.backends import sparse_coding_triton as sct

    cfg, dev = S.cfg, S.cfg.device
    B, d, k = cfg.B, cfg.d_in, cfg.top_k
    dt = getattr(torch, DT[dtype])
    idx, vals = coding_latents(cfg, n, k, seed=n)
    gen = torch.Generator(device=dev).manual_seed(1)
    W = torch.randn(n, d, generator=gen, device=dev).to(dt)  # W_dec
    G = torch.randn(B, d, generator=gen, device=dev).to(dt)  # ∂L/∂x̂
    flat, w = idx.reshape(-1), vals.reshape(-1)
    nnz, esize = flat.numel(), W.element_size()
    offsets = torch.arange(B + 1, device=dev) * k
    rows = torch.arange(B, device=dev).repeat_interleave(k)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n)
    lat_off = torch.zeros(n + 1, dtype=torch.long, device=dev)
    lat_off[1:] = counts.cumsum(0)
    used, hottest = int((counts > 0).sum()), int(counts.max())
    u = 2.0**-24

    def bag(table, segs, gather, weights):  # torch's segment sum: embedding_bag over CSR offsets
        return F.embedding_bag(gather, table, segs, mode="sum", per_sample_weights=weights.to(table.dtype),
                               include_last_offset=True)

    def dot64(a, b, ra, rb, absolute=False):  # float64 gathered dot, 65536 entries at a time
        out = torch.empty(ra.numel(), dtype=torch.float64, device=dev)
        for i in range(0, ra.numel(), 65536):
            prod = a[ra[i:i + 65536]].double() * b[rb[i:i + 65536]].double()
            out[i:i + 65536] = (prod.abs() if absolute else prod).sum(1)
        return out

    ops = {  # name: (triton, torch, float64 check, bytes gathered from the tables, other bytes, unique table bytes)
        "decode": (lambda: sct.segment_gather_sum(offsets, flat, w, W),
                   lambda: F.embedding_bag(idx, W, per_sample_weights=vals.to(dt), mode="sum"),
                   lambda got: coding_check(got, bag(W.double(), offsets, flat, w.double()),
                                            (k + 2) * u * bag(W.double().abs(), offsets, flat, w.double())),
                   nnz * d * esize, B * d * 4 + nnz * 12, used * d * esize),
        "W_dec grad": (lambda: sct.segment_gather_sum(lat_off, rows[order], w[order], G),
                       lambda: bag(G, lat_off, rows[order], w[order]),
                       lambda got: coding_check(got, bag(G.double(), lat_off, rows[order], w[order].double()),
                                                (counts[:, None] + 2) * u * bag(G.double().abs(), lat_off, rows[order],
                                                                                w[order].double())),
                       nnz * d * esize, n * d * 4 + nnz * 12 + n * 8, B * d * esize),
        "W_dec grad, id order": (lambda: sct.segment_gather_sum(lat_off, rows[order], w[order], G, longest_first=False),
                                 None, lambda got: dict(equal_to_default_order=(same := torch.equal(
                                     got, sct.segment_gather_sum(lat_off, rows[order], w[order], G))), ok=same),
                                      nnz * d * esize, n * d * 4 + nnz * 12 + n * 8, B * d * esize),
        "value grad": (lambda: sct.gathered_dot(rows, flat, G, W),
                       lambda: (G[rows].float() * W[flat].float()).sum(1),
                       lambda got: coding_check(got, dot64(G, W, rows, flat), (d + 2) * u * dot64(G, W, rows, flat, True)),
                       2 * nnz * d * esize, nnz * 20, (B + used) * d * esize),
    }
    bw, out = copy_gbps(S), []
    checks = {name: attempt(lambda op=op: op[2](op[0]())) for name, op in ops.items()}
    arms = {(name, "triton"): op[0] for name, op in ops.items() if checks[name][1] is None}
    arms |= {(name, "torch"): op[1] for name, op in ops.items() if op[1] is not None}
    variants = {}  # other launch configurations of the segment sum: the same bits, timed beside it
    for config in VARIANT_SEGMENT_CONFIGS if cfg.cuda else ((4, 8, 1),):  # (the interpreter runs its own tiles)
        for name in ("decode", "W_dec grad"):
            run = partial(with_segment_config, sct, config, ops[name][0])
            same, why = attempt(lambda run=run, name=name: torch.equal(run(), ops[name][0]()))
            variants[name, f"triton {config}"] = dict(same_bits_as_shipped=same) if why is None else dict(skipped=why)
            if why is None:
                arms[name, f"triton {config}"] = run
    res = S.time_arms(arms)
    for (name, impl), r in res.items():
        gathered, other, unique = ops[name][3:]
        floor = (gathered + other) / bw / 1e6
        row = dict(op=name, backend=impl, used_latents=used, hottest_latent=hottest, **r,
                   gathered_gbps=gathered / r["ms_median"] / 1e6, floor_ms=floor,
                   floor_unique_ms=(unique + other) / bw / 1e6, x_floor=r["ms_median"] / floor)
        out.append(row | (checks[name][0] if impl == "triton" else variants.get((name, impl), {})))
    return out + [dict(op=name, backend="triton", skipped=c[1]) for name, c in checks.items() if c[1]]


# (BLOCK_S, BLOCK_D, num_warps) timed beside the shipped sparse_coding_triton.SEGMENT_CONFIG
VARIANT_SEGMENT_CONFIGS = ((32, 128, 4), (64, 128, 8), (16, 128, 4))


def with_segment_config(module, config, fn):
    shipped, module.SEGMENT_CONFIG = module.SEGMENT_CONFIG, config
    try:
        return fn()
    finally:
        module.SEGMENT_CONFIG = shipped


def coding_step_rows(S, d_sae):
    """One TopK training step (forward, backward, AdamW) three ways on the same batches: built on
    aosae.ops.sparse_coding (sparse_encode + sparse_decode: nothing [B, n] beyond the pre-activations),
    the trainer's SAEObjective without the penalty (whatever nn/sae.py runs), and sparsify's
    SparseCoder (its Triton decoder on CUDA); and the trainer's BatchTopK step beside its TopK one.
    Checked first: the sparse step's loss and gradients against a dense fp32 TopK step on the same
    weights."""
    try:
        from aosae.ops import sparse_coding as sc
    except ImportError as err:
        return [dict(backend="aosae sparse", skipped=f"aosae.ops.sparse_coding is not in this tree ({err})")]
    from aosae.nn.sae import SparseAutoencoder
    from aosae.training.optimizer import make_optimizer

    cfg, dev, k = S.cfg, S.cfg.device, S.cfg.top_k
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(4 * cfg.B, cfg.d_in, generator=g, device=dev)
    x = x / x.norm(dim=1).mean()  # scaled like `aosae train`
    autocast = partial(torch.autocast, "cuda", dtype=torch.bfloat16, enabled=cfg.cuda)
    torch.manual_seed(0)
    with torch.device(dev):
        sae = SparseAutoencoder.from_dims(cfg.d_in, d_sae, activation="topk", top_k=k)
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]

    def sparse_loss(xb):
        lat = sc.sparse_encode(xb, sae.W_enc, sae.b_enc, sae.b_dec, "topk", k)
        return (xb - sc.sparse_decode(lat, sae.W_dec, sae.b_dec).float()).pow(2).sum(-1).mean()

    xs = x[: min(512, cfg.B)]  # the check, fp32 without autocast: the dense TopK step on the same weights
    got = torch.autograd.grad(sparse_loss(xs), params)
    pre = (xs - sae.b_dec) @ sae.W_enc + sae.b_enc
    top = pre.topk(k, dim=1)
    f = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    dense = (xs - (f @ sae.W_dec + sae.b_dec)).pow(2).sum(-1).mean()
    want = torch.autograd.grad(dense, params)
    gaps = [float((a - b).abs().max()) / max(float(b.abs().max()), 1e-30) for a, b in zip(got, want)]
    del got, want, pre, f, top
    check = dict(grad_rel_err=max(gaps), ok=max(gaps) <= 1e-3)

    total = cfg.step_warmup + cfg.step_rounds + 2
    order = torch.randint(0, x.shape[0], (total, cfg.B), generator=g, device=dev)
    opt = make_optimizer(params, 4e-4)
    arms, cursor, out = {}, {}, []

    def make_step(name, loss_fn, optimizer):
        cursor[name] = 0

        def step():  # every arm sees the same sequence of batches
            xb = x[order[cursor[name] % total]]
            with autocast():
                loss = loss_fn(xb)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            cursor[name] += 1
        return step

    def make_trainer_step(name, activation):  # aosae train's step (SAEObjective), no penalty
        objective, cursor[name] = make_objective(cfg, d_sae, activation, x, penalty=False), 0

        def step():
            losses = objective.losses(x[order[cursor[name] % total]])
            objective.optimizer_step(losses.loss)
            cursor[name] += 1
        return step

    arms["aosae sparse"] = make_step("aosae sparse", sparse_loss, opt)
    arms["aosae trainer"] = make_trainer_step("aosae trainer", "topk")
    arms["aosae trainer batchtopk"] = make_trainer_step("aosae trainer batchtopk", "batchtopk")  # B·k over the batch
    try:
        if not cfg.cuda:  # sparsify picks its Triton decoder whenever triton imports; CPU tensors fail there
            os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
        from sparsify import SparseCoder, SparseCoderConfig

        torch.manual_seed(0)
        coder = SparseCoder(cfg.d_in, SparseCoderConfig(num_latents=d_sae, k=k), device=dev)
        arms["sparsify"] = make_step("sparsify", lambda xb: coder(xb).fvu, make_optimizer(coder.parameters(), 4e-4))
    except Exception as err:  # not installed, or it fails here: the other arms still run
        out.append(dict(backend="sparsify", skipped=reason(err)))
    res = S.time_arms(arms, cfg.step_warmup, cfg.step_rounds)
    for name, r in res.items():
        row = dict(backend=name, **r, **(check if name == "aosae sparse" else {}))
        for other in ("sparsify", "aosae trainer"):
            if other in res and other != name:
                row[f"x_{other.replace(' ', '_')}"] = r["ms_median"] / res[other]["ms_median"]
        out.append(row)
    return out


def summarize_coding(doc):
    """Section 6 in a few lines: each primitive against torch and its floor, the step against sparsify."""
    rows = [r for r in doc["rows"] if r["section"] in ("sparse_coding", "sparse_step") and "skipped" not in r]
    ms = {(r.get("op"), r["backend"], r.get("n"), r.get("dtype")): r["ms_median"] for r in rows}
    for r in (r for r in rows if r["section"] == "sparse_coding" and r["backend"] == "triton"):
        torch_ms = ms.get((r["op"], "torch", r["n"], r["dtype"]))
        print(f"{r['op']:26s} n {r['n']:>7} {r['dtype']:4s} triton {r['ms_median']:8.3f} ms = {r['x_floor']:.2f}x floor"
              f" ({r['floor_ms']:.3f} ms; unique rows {r['floor_unique_ms']:.3f})"
              + (f", torch {torch_ms:.3f} ms" if torch_ms else "") + ("" if r.get("ok") else "  CHECK FAILED"))
    for r in (r for r in rows if r["section"] == "sparse_step" and r["backend"] == "aosae sparse"):
        ratio = r.get("x_sparsify")
        verdict = "not measured" if ratio is None else ("met" if ratio <= 1.0 else "missed")
        print(f"sparse TopK step d_sae {r['d_sae']}: {r['ms_median']:.2f} ms, ÷ sparsify "
              f"{'-' if ratio is None else f'{ratio:.2f}x'} (goal ≤ 1.0x: {verdict}), ÷ trainer step "
              f"{r.get('x_aosae_trainer', float('nan')):.2f}x{'' if r.get('ok') else '  CHECK FAILED'}")
    for r in (r for r in rows if r["section"] == "sparse_step" and r["backend"] == "aosae trainer"):
        ratio = r.get("x_sparsify")
        print(f"trainer TopK step d_sae {r['d_sae']}: {r['ms_median']:.2f} ms, ÷ sparsify "
              f"{'-' if ratio is None else f'{ratio:.2f}x'} (goal ≤ 1.0x: "
              f"{'not measured' if ratio is None else 'met' if ratio <= 1.0 else 'missed'})")
    for r in (r for r in rows if r["section"] == "sparse_step" and r["backend"] == "aosae trainer batchtopk"):
        print(f"trainer BatchTopK step d_sae {r['d_sae']}: {r['ms_median']:.2f} ms, ÷ trainer TopK step "
              f"{r.get('x_aosae_trainer', float('nan')):.2f}x")


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
