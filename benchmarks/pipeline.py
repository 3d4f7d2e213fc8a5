"""Activation pipeline benchmark: collection tokens/s, training tokens/s and peak RSS vs --tokens.

    nice -n 10 python benchmarks/pipeline.py                 # the default rows below (~15-20 min on 2 cores)
    python benchmarks/pipeline.py --real-tokens 20000 --synthetic-tokens 1e6 --big-tokens 0   # a quick look

Rows (every measurement in a fresh process, so each peak RSS is that process's own):
- real: the default model (SmolLM2-135M, layer 6) collects --real-tokens into a fresh store
  (collection tokens/s = LM forward + store writes, model load excluded), then `aosae train`'s
  Trainer runs --steps on it. Peak RSS covers collection and training.
- synthetic: a synthetic source (sparse sums of a fixed random dictionary, width 576 like the
  default model) writes the store `aosae train --tokens N` would use (the store does not care
  where rows come from; "collection tokens/s" is then the store's write rate), then the real CLI
  `aosae train --tokens N --steps S` runs on it (peak RSS from wait4, sampled RSS over time).
  Sizes: --synthetic-tokens, plus --big-tokens, by default the smallest multiple of 10⁶ whose
  store is larger than this machine's RAM (if the disk cannot hold it: the largest that fits,
  and the row says so).
- full pass: one process reads every row of the biggest store once through the mixing buffer
  (group loads as in training), sampling its RSS: read tokens/s and RSS over the pass.
- A/B: training step time with the store vs the former in-RAM float32 tensor (one buffer group:
  the old full-permutation order), same rows, same shapes, arms alternated inside one process in
  rounds of --ab-steps steps (so the store arm's group loads and prefetches are included);
  median and IQR over rounds, and the ratio of total times. Each arm's first batch is checked
  against a direct computation.

Output: benchmarks/results/pipeline-<machine>.json and .png (peak RSS vs tokens, RSS over time,
throughput). The stores are deleted at the end unless --keep-stores.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_name, slug, today, versions, write_rows  # noqa: E402

D_MODEL = 576  # SmolLM2-135M's width: synthetic stores are what `aosae train` would collect from it
ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


_POOL: dict = {}


def synthetic_block(index: int, n: int, d: int = D_MODEL, m: int = 4096, k: int = 16) -> torch.Tensor:
    """Rows of block `index` [n ≤ 2^17, d], deterministic: a block-dependent slice of a fixed pool of 2^17
    synthetic activations (x = Σ_j v_j · D_{i_j}, k of m unit directions, exponential v, + noise), scaled
    per block by 1 ± 1 %, so that writing 10⁷ rows costs copies, not generation."""
    if "pool" not in _POOL:
        gen = torch.Generator().manual_seed(7)
        dictionary = torch.nn.functional.normalize(torch.randn(m, d, generator=gen), dim=1)
        idx = torch.randint(m, (1 << 17, k), generator=gen)
        vals = torch.empty(1 << 17, k).exponential_(generator=gen) * 8
        pool = torch.nn.functional.embedding_bag(idx, dictionary, per_sample_weights=vals, mode="sum")
        _POOL["pool"] = pool + 0.1 * torch.randn(pool.shape, generator=gen)
    pool = _POOL["pool"]
    start = (index * 104_729) % (pool.shape[0] - n + 1)
    return pool[start : start + n] * (1 + 0.01 * ((index * 37) % 201 - 100) / 100)


BLOCK = 65_536


def spec_for(tokens: int, cache: Path):
    from aosae.data.sources import ActivationSpec

    return ActivationSpec(model=None, layer=6, dataset=None, tokens=tokens, context=128, cache_dir=str(cache))


# ----------------------------------------------------------------------------- child processes
def child_synth(tokens: int, cache: Path) -> dict:
    from aosae.data.store import ActivationStore, StoreWriter

    spec = spec_for(tokens, cache)
    t0 = time.perf_counter()
    writer = StoreWriter(spec.directory(), D_MODEL, spec.store_dtype, {**spec.fields(), "source": "synthetic"})
    for b, start in enumerate(range(0, tokens, BLOCK)):
        writer.append(synthetic_block(b, min(BLOCK, tokens - start)), 0)
    writer.finish()
    seconds = time.perf_counter() - t0
    store = ActivationStore.open(spec.directory())
    last = (tokens - 1) // BLOCK  # reference check: the stored rows are the source's, rounded to bf16
    want = synthetic_block(last, tokens - last * BLOCK).to(store.dtype)
    assert torch.equal(store.read(last * BLOCK, tokens), want), "store rows differ from the synthetic source"
    return {"collect_seconds": seconds, "collect_tokens_per_s": tokens / seconds, "peak_rss_mib": peak_rss_mib(),
            "store_gib": tokens * D_MODEL * store.dtype.itemsize / 2**30}


def _timed_steps(patch_target) -> list:
    stamps = []
    real = patch_target._train_step

    def timed(self):
        row = real(self)
        stamps.append(time.perf_counter())
        return row

    patch_target._train_step = timed
    return stamps


def _train_rate(stamps: list, batch: int) -> float:
    return batch * (len(stamps) - 2) / (stamps[-1] - stamps[1])  # steps 3..S: the first loads the buffer


def child_real(tokens: int, cache: Path, out: Path, steps: int) -> dict:
    """Collect with the default model into a fresh store, then train on it (the CLI's Trainer)."""
    from aosae.data.activations import collect_to_store
    from aosae.data.language_models import load_model
    from aosae.data.store import StoreWriter
    from aosae.data.text import iter_texts
    from aosae.training.config import TrainConfig
    from aosae.training.trainer import Trainer

    spec = spec_for(tokens, cache)
    model, tok = load_model(None)
    t0 = time.perf_counter()
    writer = StoreWriter(spec.directory(), D_MODEL, spec.store_dtype, {**spec.fields(), "source": "real"})
    collect_to_store(writer, model, tok, iter_texts(None), 6, tokens, context=128, lm_batch=16)
    seconds = time.perf_counter() - t0
    del model
    stamps = _timed_steps(Trainer)
    cfg = TrainConfig(tokens=tokens, steps=steps, cache_dir=str(cache), out=str(out), checkpoint_every=10**6)
    Trainer(cfg, progress=False).run()
    return {"collect_seconds": seconds, "collect_tokens_per_s": tokens / seconds,
            "train_tokens_per_s": _train_rate(stamps, cfg.batch_size), "peak_rss_mib": peak_rss_mib()}


def child_cli(tokens: int, cache: Path, out: Path, steps: int) -> dict:
    """`aosae train` itself (cli.main), with a timestamp per training step."""
    from aosae.cli import main
    from aosae.training.trainer import Trainer

    stamps = _timed_steps(Trainer)
    rc = main(["train", "--tokens", str(tokens), "--steps", str(steps), "--cache-dir", str(cache), "--out", str(out),
               "--checkpoint-every", str(10**6), "--no-progress"])
    assert rc == 0, f"aosae train exited with {rc}"
    return {"train_tokens_per_s": _train_rate(stamps, 2048), "steps": steps}


def child_fullpass(tokens: int, cache: Path) -> dict:
    from aosae.data.mixing import MixingBuffer, RowRange
    from aosae.data.store import ActivationStore

    store = ActivationStore.open(spec_for(tokens, cache).directory())
    buf = MixingBuffer(RowRange(store, 0, store.n_tokens), 2048, 131_072, seed=0)
    timeline, stop = [], threading.Event()
    t0 = time.perf_counter()

    def sample():
        while not stop.is_set():
            with open("/proc/self/statm") as f:
                timeline.append((time.perf_counter() - t0, int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20))
            time.sleep(0.5)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    for g in range(buf.n_groups - (0 if buf.last_group_steps else 1)):
        buf.batch(g * buf.steps_per_group)
    seconds = time.perf_counter() - t0
    stop.set()
    thread.join()
    buf.close()
    return {"read_seconds": seconds, "read_tokens_per_s": store.n_tokens / seconds,
            "read_gib_per_s": store.n_tokens * D_MODEL * 2 / 2**30 / seconds, "peak_rss_mib": peak_rss_mib(),
            "rss_timeline": timeline}


def child_ab(tokens: int, cache: Path, out: Path, rounds: int, steps: int) -> dict:
    """Step time: store-backed Trainer vs a Trainer on the same rows as one float32 tensor in RAM."""
    from aosae.data.store import ActivationStore
    from aosae.training.config import TrainConfig
    from aosae.training.trainer import EVAL_TOKENS, Trainer

    store = ActivationStore.open(spec_for(tokens, cache).directory())
    base = dict(tokens=tokens, steps=10**6, cache_dir=str(cache), checkpoint_every=10**6)
    on_disk = Trainer(TrainConfig(**base, out=str(out / "store")), progress=False)
    in_ram = Trainer(TrainConfig(**base, out=str(out / "ram"), buffer_tokens=tokens), progress=False,
                     activations=store.read(0, tokens).float())
    # reference check: each arm's first batch, computed directly from the rows
    n_train = tokens - min(EVAL_TOKENS, tokens // 10)
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(0))
    assert torch.equal(in_ram.buffer.batch(0), store.read(0, n_train)[perm[:2048]].float())
    pieces = on_disk.buffer.pieces(0, 0)
    group = torch.cat([store.read(a, b) for a, b in pieces])
    gperm = torch.randperm(group.shape[0], generator=torch.Generator().manual_seed(0))
    assert torch.equal(on_disk.buffer.batch(0), group[gperm[:2048]].float())
    times = {"store": [], "in_ram": []}
    for _ in range(rounds):
        for name, trainer in (("store", on_disk), ("in_ram", in_ram)):
            t0 = time.perf_counter()
            for _ in range(steps):
                trainer._train_step()
            times[name].append((time.perf_counter() - t0) / steps)
    on_disk.buffer.close()

    def spread(xs):
        q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
        return {"median_s": statistics.median(xs), "iqr_s": [q[0], q[2]], "all_s": xs}

    ratios = [r / s for s, r in zip(times["store"], times["in_ram"])]  # store throughput ÷ in-RAM throughput
    return {"store": spread(times["store"]), "in_ram": spread(times["in_ram"]), "rounds": rounds,
            "steps_per_round": steps, "throughput_ratio_total": sum(times["in_ram"]) / sum(times["store"]),
            "throughput_ratio_median": statistics.median(ratios), "throughput_ratios": ratios,
            "store_train_tokens_per_s": 2048 / statistics.median(times["store"]),
            "in_ram_train_tokens_per_s": 2048 / statistics.median(times["in_ram"])}


# ----------------------------------------------------------------------------- the parent
def run_child(args: list, timeline: bool = False) -> dict:
    """Run this script as a child; returns its JSON plus wait4's peak RSS (and an RSS timeline)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, __file__, "--child", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    samples, t0 = [], time.perf_counter()
    out_chunks = []
    reader = threading.Thread(target=lambda: out_chunks.append(proc.stdout.read()), daemon=True)
    err_chunks = []
    err_reader = threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()), daemon=True)
    reader.start()
    err_reader.start()
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if timeline:
            try:
                with open(f"/proc/{proc.pid}/statm") as f:
                    samples.append((time.perf_counter() - t0, int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20))
            except OSError:
                pass
        time.sleep(0.25)
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join()
    err_reader.join()
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed ({proc.returncode}):\n{''.join(err_chunks)[-3000:]}")
    res = json.loads("".join(out_chunks).strip().splitlines()[-1])
    res["process_peak_rss_mib"] = usage.ru_maxrss / 1024
    res["wall_s"] = time.perf_counter() - t0
    if timeline:
        res["rss_timeline"] = samples
    return res


def big_size(root: Path, requested: float, planned_bytes: int) -> tuple[int, str]:
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    row = D_MODEL * 2
    free = shutil.disk_usage(root).free - planned_bytes - (4 << 30)  # leave 4 GiB for everyone else
    want = int(requested) if requested > 0 else (ram // row // 10**6 + 1) * 10**6
    if want * row > free:
        fit = max(0, free // row // 10**6 * 10**6)
        return fit, (f"a store larger than RAM ({ram / 2**30:.1f} GiB) does not fit on the disk "
                     f"({free / 2**30:.1f} GiB free after the other stores): used the largest that fits")
    return want, f"larger than RAM ({want * row / 2**30:.1f} GiB store vs {ram / 2**30:.1f} GiB RAM)"


def plot(rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    cli = [r for r in rows if r["kind"] == "synthetic"]
    real = [r for r in rows if r["kind"] == "real"]
    ax = axes[0]
    ax.plot([r["tokens"] for r in cli], [r["train_peak_rss_mib"] / 1024 for r in cli], "o-", label="aosae train (store)")
    ax.plot([r["tokens"] for r in real], [r["peak_rss_mib"] / 1024 for r in real], "s", label="collect + train, real LM")
    ax.plot([r["tokens"] for r in cli], [r["tokens"] * D_MODEL * 4 / 2**30 for r in cli], "k--",
            label="float32 activations in RAM (before)")
    ax.plot([r["tokens"] for r in cli], [r["store_gib"] for r in cli], ":", color="grey", label="store on disk (bf16)")
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    ax.axhline(ram, color="red", lw=0.8, label=f"RAM {ram:.0f} GiB")
    ax.set(xscale="log", yscale="log", xlabel="--tokens", ylabel="GiB", title="peak RSS vs token budget")
    ax.legend(fontsize=7)
    ax = axes[1]
    for r in cli:
        t = r.get("train_rss_timeline") or []
        ax.plot([a for a, _ in t], [b / 1024 for _, b in t], label=f"aosae train, {r['tokens']:.2g} tokens")
    for r in rows:
        if r["kind"] == "full_pass":
            t = r["rss_timeline"]
            ax.plot([a for a, _ in t], [b / 1024 for _, b in t], "k", lw=2, label=f"full pass, {r['store_gib']:.1f} GiB store")
    ax.set(xlabel="seconds", ylabel="RSS (GiB)", title="resident memory over time")
    ax.legend(fontsize=7)
    ax = axes[2]
    names = [f"{r['kind']} {r['tokens']:.2g}" for r in rows if r.get("train_tokens_per_s")]
    ax.barh(names, [r["train_tokens_per_s"] for r in rows if r.get("train_tokens_per_s")])
    for r in rows:
        if r["kind"] == "ab":
            ax.set_title(f"training tokens/s (A/B store ÷ in-RAM: {r['throughput_ratio_total']:.3f})")
    ax.set(xlabel="training tokens/s")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--real-tokens", type=float, nargs="*", default=[20_000, 60_000])
    p.add_argument("--synthetic-tokens", type=float, nargs="*", default=[1e6, 2e6, 4e6])
    p.add_argument("--big-tokens", type=float, default=-1, help="-1: just larger than RAM; 0: no big row")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--ab-rounds", type=int, default=6)
    p.add_argument("--ab-steps", type=int, default=32, help="steps per arm per round (64 = one buffer group)")
    p.add_argument("--root", default=str(ROOT.parent / ".bench_pipeline"))
    p.add_argument("--keep-stores", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    if a.child:
        kind, tokens, *rest = a.child
        fn = {"synth": child_synth, "real": child_real, "cli": child_cli, "fullpass": child_fullpass, "ab": child_ab}[kind]
        args = [int(float(tokens))] + [Path(x) if "/" in x else int(x) for x in rest]
        print(json.dumps(fn(*args)))
        return
    root = Path(a.root)
    root.mkdir(parents=True, exist_ok=True)
    cache, runs = root / "cache", root / "runs"
    synthetic = [int(t) for t in a.synthetic_tokens]
    planned = sum(synthetic) * D_MODEL * 2
    big, big_note = big_size(root, a.big_tokens, planned) if a.big_tokens != 0 else (0, "")
    sizes = synthetic + ([big] if big else [])
    common = {"machine": machine_name(), "versions": versions(), "date": today(), "d_model": D_MODEL,
              "batch_size": 2048, "d_sae": D_MODEL, "store_dtype": "bfloat16", "buffer_tokens": 131_072,
              "load_average_at_start": os.getloadavg()[0]}
    rows = []
    try:
        for n in [int(t) for t in a.real_tokens]:
            print(f"real model: collecting {n:,} tokens and training {a.steps} steps", flush=True)
            res = run_child(["real", n, root / f"real-cache-{n}", runs / f"real-{n}", a.steps])
            rows.append({**common, "kind": "real", "tokens": n, "source": "SmolLM2-135M layer 6, stdlib text", **res})
            shutil.rmtree(root / f"real-cache-{n}", ignore_errors=True)
        for n in sizes:
            print(f"synthetic store: {n:,} tokens", flush=True)
            w = run_child(["synth", n, cache])
            print(f"  aosae train --tokens {n:,} --steps {a.steps}", flush=True)
            t = run_child(["cli", n, cache, runs / f"cli-{n}", a.steps], timeline=True)
            rows.append({**common, "kind": "synthetic", "tokens": n, "source": "synthetic (sparse dictionary sums)",
                         "note": big_note if n == big else "", "collect_tokens_per_s": w["collect_tokens_per_s"],
                         "collect_seconds": w["collect_seconds"], "store_gib": w["store_gib"],
                         "writer_peak_rss_mib": w["process_peak_rss_mib"], "train_tokens_per_s": t["train_tokens_per_s"],
                         "train_peak_rss_mib": t["process_peak_rss_mib"], "train_wall_s": t["wall_s"],
                         "train_rss_timeline": t["rss_timeline"]})
            write_rows(Path(a.out or ROOT / f"benchmarks/results/pipeline-{slug(machine_name())}.json"), rows)
        if sizes:
            n = max(sizes)
            print(f"full pass over the {n:,}-token store", flush=True)
            f = run_child(["fullpass", n, cache])
            rows.append({**common, "kind": "full_pass", "tokens": n, "store_gib": n * D_MODEL * 2 / 2**30,
                         "note": big_note if n == big else "", **f})
            n = min(sizes)
            print(f"A/B store vs in-RAM at {n:,} tokens", flush=True)
            rows.append({**common, "kind": "ab", "tokens": n, **run_child(["ab", n, cache, runs / "ab", a.ab_rounds, a.ab_steps])})
    finally:
        if not a.keep_stores:
            shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(runs, ignore_errors=True)
    out = Path(a.out or ROOT / f"benchmarks/results/pipeline-{slug(machine_name())}.json")
    write_rows(out, rows)
    plot(rows, out.with_suffix(".png"))
    for r in rows:
        keep = {k: v for k, v in r.items() if k not in ("machine", "versions", "date", "rss_timeline", "train_rss_timeline")}
        print(json.dumps(keep))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
