"""SAE step time and peak memory across widths: aosae's TopK step against EleutherAI sparsify's
SparseCoder, the penalty's cost on that step, and BatchTopK against TopK (issue 20).

Arms (TopK k = 64, fp32, AdamW lr 4e-4 without weight decay (torch's fused kernel, the trainer's
aosae.training.optimizer.make_optimizer, for every arm), the same batches for every arm):
  aosae-topk, aosae-topk+penalty        SAEObjective, the trainer's step (TopKOrthoLoss(0.005) or none)
  aosae-batchtopk, aosae-batchtopk+penalty   the same with activation "batchtopk" (when aosae has it)
  sparsify-topk                         sparsify's SparseCoder stepped as its trainer does (unit-norm
                                        decoder, forward with dead_mask None, fvu + 0·AuxK, parallel
                                        decoder gradient removed), with AdamW instead of its default
                                        optimiser, and its eager embedding_bag decoder (SPARSIFY_DISABLE_TRITON)
  floor-encoder-gemm                    the encoder product x[B, d_in] @ W_enc[d_in, n] alone: the
                                        2·B·d_in·n FLOPs that an exact top-k needs, timed in the same run

Every arm runs in its own subprocess (one per arm and width). Before timing, each process
compares its arm with a float64 dense reference on the same weights (aosae: loss and gradients,
penalty included; sparsify: its reconstruction and gradients, its weights copied from aosae's
SAE), then resets its peak RSS (VmHWM, /proc/self/clear_refs), so the peak reported is the
training's alone (weights, optimiser, steps). Where every arm's memory fits --mem-budget-gib at
once (default: the memory free at the start less 4 GiB), the arms' processes stay alive together
and take turns, one step each per round (order reversed every other round; ratios are per
round); otherwise (the large widths) they run one at
a time in blocks ABC…, …CBA, each block a fresh process with the same warm-up and fewer timed
steps (--blocks-rounds; ratios of medians; the check runs in the first block).
Reported: every timed step (median, quartiles, min, max: never the best alone), peak RSS, the
float64 check's gaps, the load average around each width (shared_machine when another process ran).
Each worker runs under an RLIMIT_DATA cap (what the machine has free at its start, less a margin),
so an arm that does not fit fails with "out of memory under its cap" instead of starting the OOM killer.

  python benchmarks/width_sweep.py                                    # the full sweep (~25 min, quiet machine)
  python benchmarks/width_sweep.py --widths 4096 16384 --rounds 2 --tag smoke
  python benchmarks/width_sweep.py --widths 16384 --arms aosae-batchtopk aosae-batchtopk+penalty --trained-steps 100

--trained-steps N: each arm first trains N untimed steps (its own objective without the penalty,
on a batch stream of its own, the same for every arm: an arm with the penalty and one without
start their timed steps from the same state), so the timed steps are those of a run past its
start. At initialisation BatchTopK puts the batch's B·k latents on a few dozen
high-norm tokens (31 of 2048 rows at d_sae 65536); within ≈ 50 steps they spread over all rows.

Shapes: B = 2048, d_in = 576 (SmolLM2-135M's residual stream, the default model's cached
activations scaled to mean norm 1) up to --big-width (exclusive); at and above it B = --big-batch
and d_in = --big-d-in, the activations projected to d_in by a fixed Gaussian matrix (an fp32 SAE
at 2²⁰ latents and d_in 576 with AdamW state is ≈ 19 GB). Rows go to
benchmarks/results/width-<machine>[-tag].json (+ .png).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from width_arms import FRACTION, LR, import_sparsify, worker
from width_report import plot, table

ARMS = ("aosae-topk", "aosae-topk+penalty", "sparsify-topk", "aosae-batchtopk", "aosae-batchtopk+penalty",
        "floor-encoder-gemm")
RATIOS = {  # name: (numerator arm, denominator arm)
    "aosae-topk / sparsify-topk": ("aosae-topk", "sparsify-topk"),
    "topk: with / without penalty": ("aosae-topk+penalty", "aosae-topk"),
    "batchtopk: with / without penalty": ("aosae-batchtopk+penalty", "aosae-batchtopk"),
    "batchtopk / topk": ("aosae-batchtopk", "aosae-topk"),
    "aosae-topk / floor": ("aosae-topk", "floor-encoder-gemm"),
    "sparsify-topk / floor": ("sparsify-topk", "floor-encoder-gemm"),
}


# ----------------------------------------------------------------------------- parent side

class Arm:
    """A worker process of one arm at one width, spoken to over its stdin/stdout."""

    def __init__(self, name: str, shape: dict, args, cap_gib: float):
        cmd = [sys.executable, __file__, "--worker", name, "--width", str(shape["width"]), "--batch", str(shape["batch"]),
               "--d-in", str(shape["d_in"]), "--k", str(args.k), "--data", shape["data"], "--seed", str(args.seed),
               "--threads", str(args.threads), "--mem-cap-gib", f"{cap_gib:.2f}",
               "--check-tol", str(args.check_tol), "--trained-steps", str(args.trained_steps)]
        self.name, self.cap_gib = name, cap_gib
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def ask(self, command: str | None) -> dict:
        try:
            if command is not None:
                self.proc.stdin.write(command + "\n")
                self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            code = self.proc.wait()
            return {"error": f"worker exited with status {code}" + (" (killed: out of memory?)" if code == -9 else "")}
        reply = json.loads(line)
        if "error" in reply and ("can't allocate" in reply["error"] or "MemoryError" in reply["error"]):
            reply["error"] = f"out of memory under its {self.cap_gib:.1f} GiB cap: " + reply["error"]
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def available(args) -> list[str]:
    """The arms this installation can run: sparsify needs its optional extra, batchtopk a recent aosae."""
    from aosae.nn.sae import ACTIVATIONS

    arms = []
    for name in args.arms:
        if name == "sparsify-topk":
            try:
                import_sparsify()
            except ImportError as e:
                print(f"skipping {name}: {e} (pip install -e '.[bench]' or bash .ci/install_integrations.sh bench)")
                continue
        if "batchtopk" in name and "batchtopk" not in ACTIVATIONS:
            print(f"skipping {name}: this aosae has no activation 'batchtopk'")
            continue
        arms.append(name)
    return arms


def estimate_gib(name: str, width: int, batch: int, d_in: int, k: int) -> tuple[float, float]:
    """A generous guess of an arm's memory, GiB: (held between steps, extra during a step).
    Held: the process (~0.4 GiB) and 4 copies of the weights (weights, gradients, AdamW's two
    moments); during a step: [B, n] fp32 tensors (aosae's sparse step: the pre-activations and its
    selection's masks, two in all: measured 1.7 at d_sae 262144; sparsify: six, a dense step's
    peak) and the co-active pairs of the penalty (value, row, col; a few copies)."""
    if name == "floor-encoder-gemm":
        return 0.4 + d_in * width * 4 / 2**30, batch * width * 4 / 2**30
    params = (2 * width * d_in + width + d_in) * 4
    pairs = batch * k * k // 2 * 24 if name.endswith("+penalty") else 0
    dense = 6 if name.startswith("sparsify") else 2
    return 0.4 + 4 * params / 2**30, (dense * batch * width * 4 + 4 * pairs) / 2**30


def launch_cap(args) -> float:
    """A worker's memory cap: what the machine has free now less a margin (others share it)."""
    return max(1.0, min(args.worker_cap_gib, mem_available_gib() - 1.5))


def mem_available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def spread(times: list[float]) -> dict:
    from machine import spread as machine_spread  # (benchmarks/machine.py imports torch: not at import time)

    return machine_spread(times, "_s")


def check_and_init(p: Arm, row: dict, check: bool = True) -> bool:
    """The float64 check (first), then the arm's state; False (and the row says why) on failure."""
    if check:
        reply = p.ask("check")
        if "error" in reply:
            row["status"] = f"check failed: {reply['error']}"
            return False
        row["check"] = reply["check"]
    reply = p.ask("init")
    if "error" in reply:
        row["status"] = f"failed at init: {reply['error']}"
        return False
    return True


def run_checks(arms: list[str], shape: dict, args, rows: dict) -> None:
    """--check-only: each arm's float64 check in its own process."""
    for name in arms:
        p = Arm(name, shape, args, launch_cap(args))
        try:
            reply = p.ask("check")
        finally:
            p.close()
        rows[name]["check"] = reply.get("check", reply.get("error"))


def run_interleaved(arms: list[str], shape: dict, args, rows: dict) -> None:
    """All arms alive together; round r runs one step of each, order reversed every other round."""
    procs = {name: Arm(name, shape, args, min(args.worker_cap_gib, 2 * shape["est_gib"][name] + 2.0)) for name in arms}
    try:
        for name, p in procs.items():
            check_and_init(p, rows[name])
        live = [n for n in arms if rows[n]["status"] == "ok"]
        for r in range(shape["warmup"] + shape["rounds"]):
            for name in (live if r % 2 == 0 else live[::-1]):
                if rows[name]["status"] != "ok":
                    continue
                reply = procs[name].ask(f"step {r}")
                if "error" in reply:
                    rows[name]["status"] = f"failed at round {r}: {reply['error']}"
                elif r >= shape["warmup"]:
                    rows[name]["times_s"].append(reply["t"])
                    rows[name]["rounds_of"].append(r)
                    if reply["l0"] is not None:
                        rows[name]["l0"].append(reply["l0"])
        for name in live:
            if rows[name]["status"] == "ok":
                rows[name].update(procs[name].ask("done"))
    finally:
        for p in procs.values():
            p.close()


def run_blocks(arms: list[str], shape: dict, args, rows: dict) -> None:
    """One arm alive at a time, in blocks ABC…CBA…, each block its own process and warm-up."""
    per_block = math.ceil(shape["rounds"] / shape["blocks"])
    for b in range(shape["blocks"]):
        todo = min(per_block, shape["rounds"] - b * per_block)
        for name in (arms if b % 2 == 0 else arms[::-1]):
            if rows[name]["status"] != "ok" or todo <= 0:
                continue
            p = Arm(name, shape, args, launch_cap(args))
            try:
                if not check_and_init(p, rows[name], check=b == 0):
                    continue
                first = shape["warmup"] + b * per_block  # the rounds' batches continue across blocks
                for r in range(first - shape["warmup"], first + todo):
                    reply = p.ask(f"step {r}")
                    if "error" in reply:
                        rows[name]["status"] = f"failed at round {r}: {reply['error']}"
                        break
                    if r >= first:
                        rows[name]["times_s"].append(reply["t"])
                        rows[name]["rounds_of"].append(r)
                        if reply["l0"] is not None:
                            rows[name]["l0"].append(reply["l0"])
                if rows[name]["status"] == "ok":
                    done = p.ask("done")
                    rows[name]["peak_rss_mib"] = max(rows[name].get("peak_rss_mib", 0), done["peak_rss_mib"])
                    rows[name]["baseline_rss_mib"] = done["baseline_rss_mib"]
            finally:
                p.close()


def ratio_rows(rows: dict, mode: str) -> dict:
    """Per-round ratios where the arms alternated within rounds, else the ratio of medians."""
    out = {}
    for label, (a, b) in RATIOS.items():
        ra, rb = rows.get(a), rows.get(b)
        if not ra or not rb or ra["status"] != "ok" or rb["status"] != "ok" or not ra["times_s"] or not rb["times_s"]:
            continue
        if mode == "interleaved":
            tb = dict(zip(rb["rounds_of"], rb["times_s"]))
            per_round = [t / tb[r] for r, t in zip(ra["rounds_of"], ra["times_s"]) if r in tb]
            out[label] = {"per_round": True, **spread(per_round)}
        else:
            out[label] = {"per_round": False, "median_s": ra["median_s"] / rb["median_s"]}
    return out


def prepare_data(args, d_in: int) -> str:
    """The default model's activations (scaled to mean norm 1), projected to d_in when smaller."""
    import torch

    path = Path(args.workdir) / f"width_sweep_x_{d_in}.pt"
    if path.exists():
        return str(path)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_step import load_activations

    x = load_activations(args.tokens)
    if d_in < x.shape[1]:
        proj = torch.randn(x.shape[1], d_in, generator=torch.Generator().manual_seed(1234)) / math.sqrt(d_in)
        x = x @ proj
        x = x / x.norm(dim=1).mean()
    elif d_in > x.shape[1]:
        raise ValueError(f"--big-d-in {d_in} is wider than the model's activations ({x.shape[1]})")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(x.contiguous(), path)
    return str(path)


def sweep(args) -> list[dict]:
    import torch

    from aosae.nn.sae import K_ACTIVATIONS
    from aosae.training.config import default_l1

    if args.mem_budget_gib is None:
        args.mem_budget_gib = max(2.0, mem_available_gib() - 4.0)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import machine

    arms = available(args)
    stamp = {"machine": machine.machine_name(), "versions": {**machine.versions(), "sparsify": sparsify_version()},
             "date": machine.today(), "threads": args.threads, "commit": machine.git_commit(), "k": args.k,
             "optimizer": f"AdamW (fused) lr {LR} wd 0", "dtype": "float32", "fraction": FRACTION,
             "l1_coeff": {a: default_l1(a) for a in K_ACTIVATIONS}, "trained_steps": args.trained_steps}
    out = machine.RESULTS / f"width-{machine.slug(machine.machine_name())}{'-' + args.tag if args.tag else ''}.json"
    all_rows: list[dict] = []
    for width in args.widths:
        big = width >= args.big_width
        batch, d_in = (args.big_batch, args.big_d_in) if big else (args.batch, 576)
        held_step = {name: estimate_gib(name, width, batch, d_in, args.k) for name in arms}
        est = {name: sum(v) for name, v in held_step.items()}
        # interleaved: every arm's state is held at once, one arm steps at a time
        need = sum(h for h, _ in held_step.values()) + max(t for _, t in held_step.values())
        mode = "interleaved" if need <= args.mem_budget_gib else "blocks"
        blocks = mode == "blocks"
        shape = {"width": width, "batch": batch, "d_in": d_in, "data": prepare_data(args, d_in), "est_gib": est,
                 "warmup": args.blocks_warmup if blocks else args.warmup,
                 "rounds": args.blocks_rounds if blocks else args.rounds, "blocks": args.blocks}
        load_before = os.getloadavg()
        rows = {name: {"bench": "width_sweep", "arm": name, "d_sae": width, "batch": batch, "d_in": d_in,
                       "mode": mode, "warmup": shape["warmup"], "rounds": shape["rounds"],
                       "blocks": args.blocks if blocks else None, "status": "ok",
                       "times_s": [], "rounds_of": [], "l0": [], "mem_estimate_gib": est[name]} for name in arms}
        if args.check_only:
            run_checks(arms, shape, args, rows)
            for name in arms:
                print(f"d_sae {width:8d} {name:26s} {rows[name]['check']}", flush=True)
            continue
        t0 = time.time()
        (run_interleaved if mode == "interleaved" else run_blocks)(arms, shape, args, rows)
        wall = time.time() - t0
        load_after = os.getloadavg()
        for name, row in rows.items():
            row.update(spread(row["times_s"]))
            if row.get("peak_rss_mib"):
                row["peak_above_baseline_mib"] = row["peak_rss_mib"] - row["baseline_rss_mib"]
            row["l0"] = statistics.mean(row["l0"]) if row["l0"] else None
            if name == "floor-encoder-gemm" and row["times_s"]:
                row["gemm_gflops"] = 2 * batch * d_in * width / row["median_s"] / 1e9
        ratios = ratio_rows(rows, mode)
        for name, row in rows.items():
            row.update(ratios=ratios, wall_s=wall, loadavg_before=load_before, loadavg_after=load_after,
                       shared_machine=max(load_before[0], load_after[0]) > args.threads + 0.5, **stamp)
            all_rows.append(row)
            med = f"{row['median_s']:8.3f} s [{row['q1_s']:.3f}, {row['q3_s']:.3f}]" if row.get("median_s") else "      -"
            peak = f"{row['peak_rss_mib']:8.0f} MiB" if row.get("peak_rss_mib") else ""
            print(f"d_sae {width:8d} B {batch:5d} d_in {d_in:4d} {mode:11s} {name:26s} {med} {peak}  {row['status']}",
                  flush=True)
        for label, r in ratios.items():
            print(f"    {label:36s} {r['median_s']:.3f}" + (f" [{r['q1_s']:.3f}, {r['q3_s']:.3f}]" if r["per_round"] else ""))
        machine.write_rows(out, all_rows)
    if all_rows:
        plot(all_rows, out.with_suffix(".png"))
        print(f"wrote {out}")
    return all_rows


def sparsify_version():
    try:
        from importlib.metadata import version

        return version("eai-sparsify")
    except Exception:  # noqa: BLE001
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", type=int, nargs="+", default=[4096, 16384, 65536, 262144, 1048576])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--big-width", type=int, default=524288, help="from this d_sae on, use --big-batch and --big-d-in")
    p.add_argument("--big-batch", type=int, default=512)
    p.add_argument("--big-d-in", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--blocks-warmup", type=int, default=1, help="warm-up steps of each block (blocks mode)")
    p.add_argument("--blocks-rounds", type=int, default=4, help="timed steps per arm in blocks mode (split between blocks)")
    p.add_argument("--blocks", type=int, default=2, help="blocks ABC…, CBA… in blocks mode (rounds split between them)")
    p.add_argument("--mem-budget-gib", type=float, default=None,
                   help="arms run interleaved (all alive at once) when their estimated memory fits in this "
                        "(default: the memory free at the start less 4 GiB)")
    p.add_argument("--worker-cap-gib", type=float, default=18.0, help="address-space data cap of one worker")
    p.add_argument("--trained-steps", type=int, default=0,
                   help="untimed steps each arm trains first (its own objective without the penalty, the same batches "
                        "for every arm): "
                        "times the step past initialisation, where BatchTopK's latents no longer sit on a few tokens")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--tokens", type=int, default=30000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check-tol", type=float, default=1e-4, help="largest relative gap to the float64 reference")
    p.add_argument("--workdir", default=os.environ.get("TMPDIR", "/tmp"), help="where the activations file is kept")
    p.add_argument("--tag", default="")
    p.add_argument("--check-only", action="store_true", help="run the float64 checks only (nothing is written)")
    # worker-only options
    p.add_argument("--worker", choices=ARMS, help=argparse.SUPPRESS)
    p.add_argument("--width", type=int, help=argparse.SUPPRESS)
    p.add_argument("--d-in", type=int, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--mem-cap-gib", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--table", metavar="JSON", help="print the markdown table of a results file and exit")
    args = p.parse_args()
    if args.table:
        print(table(args.table))
        return
    if args.worker:
        args.arm = args.worker
        worker(args)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sweep(args)


if __name__ == "__main__":
    main()
