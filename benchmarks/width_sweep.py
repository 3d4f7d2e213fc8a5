"""SAE step time and peak memory across widths: aosae's TopK step against EleutherAI sparsify's
SparseCoder, the penalty's cost on that step, and BatchTopK against TopK (issue 20).

Arms (TopK k = 64, fp32, AdamW lr 4e-4 without weight decay, the same batches for every arm):
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
once, the arms' processes stay alive together and take turns, one step each per round (order
reversed every other round; ratios are per round); otherwise (the large widths) they run one at
a time in blocks ABC…, …CBA, each block a fresh process with the same warm-up and fewer timed
steps (--blocks-rounds; ratios of medians; the check runs in the first block).
Reported: every timed step (median, quartiles, min, max: never the best alone), peak RSS, the
float64 check's gaps, the load average around each width (shared_machine when another process ran).
Each worker runs under an RLIMIT_DATA cap (what the machine has free at its start, less a margin),
so an arm that does not fit fails with "out of memory under its cap" instead of starting the OOM killer.

  python benchmarks/width_sweep.py                                    # the full sweep (~25 min, quiet machine)
  python benchmarks/width_sweep.py --widths 4096 16384 --rounds 2 --tag smoke
  python benchmarks/width_sweep.py --widths 16384 --arms aosae-batchtopk aosae-batchtopk+penalty --trained-steps 100

--trained-steps N: each arm first trains N untimed steps (its own objective, penalty included,
on a batch stream of its own, the same for every arm), so the timed steps are those of a run
past its start. At initialisation BatchTopK puts the batch's B·k latents on a few dozen
high-norm tokens (31 of 2048 rows at d_sae 65536); within ≈ 50 steps they spread over all rows.

Shapes: B = 2048, d_in = 576 (SmolLM2-135M's residual stream, the default model's cached
activations scaled to mean norm 1) up to --big-width (exclusive); at and above it B = --big-batch
and d_in = --big-d-in, the activations projected to d_in by a fixed Gaussian matrix (an fp32 SAE
at 2²⁰ latents and d_in 576 with AdamW state is ≈ 19 GB). Rows go to
benchmarks/results/width-<machine>[-tag].json (+ .png).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

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
LR, L1_COEFF, FRACTION = 4e-4, 0.04, 0.005
CHECK_ROWS = 64  # rows of the float64 reference check (its penalty reference is dense over the active latents)


# ----------------------------------------------------------------------------- worker side

def load_data(path: str):
    import torch

    return torch.load(path, weights_only=True)


def batch_of(x, batch: int, seed: int, r: int):
    """The batch of round r: the same rows for every arm."""
    import torch

    gen = torch.Generator().manual_seed(seed * 100_003 + r)
    return x[torch.randint(0, x.shape[0], (batch,), generator=gen)]


def make_aosae(d_in: int, n: int, activation: str, k: int, x, seed: int):
    import torch
    from aosae.nn.sae import SparseAutoencoder

    torch.manual_seed(seed)
    sae = SparseAutoencoder.from_dims(d_in, n, activation=activation, top_k=k)
    sae.init_b_dec_(x[:4096], method="mean")
    return sae


def aosae_objective(sae, penalty: bool):
    import torch
    from aosae.nn.loss import TopKOrthoLoss
    from aosae.nn.tau import AdaptiveTau
    from aosae.training.step import SAEObjective

    opt = torch.optim.AdamW(sae.parameters(), lr=LR, betas=(0.9, 0.999), weight_decay=0.0)  # the trainer's
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return SAEObjective(sae, opt, sched, L1_COEFF, TopKOrthoLoss(FRACTION) if penalty else None, AdaptiveTau())


def import_sparsify():
    os.environ["SPARSIFY_DISABLE_TRITON"] = "1"  # its Triton decoder fails on CPU tensors
    import sparsify

    return sparsify


def make_sparsify(sae):
    """A SparseCoder holding aosae's weights (encoder.weight is W_encᵀ [n, d_in]; W_dec [n, d_in] as aosae)."""
    import torch

    sparsify = import_sparsify()
    cfg = sparsify.SparseCoderConfig(activation="topk", num_latents=sae.d_sae, k=sae.cfg.top_k)
    coder = sparsify.SparseCoder(sae.d_in, cfg, dtype=torch.float32)
    with torch.no_grad():
        coder.encoder.weight.copy_(sae.W_enc.t())
        coder.encoder.bias.copy_(sae.b_enc)
        coder.W_dec.copy_(sae.W_dec)
        coder.b_dec.copy_(sae.b_dec)
    return coder


class SparsifyStep:
    """One step of sparsify's trainer (sparsify/trainer.py, fvu loss, one micro-batch), with AdamW."""

    def __init__(self, coder):
        import torch

        self.coder = coder
        self.opt = torch.optim.AdamW(coder.parameters(), lr=LR, betas=(0.9, 0.999), weight_decay=0.0)

    def __call__(self, x):
        self.coder.set_decoder_norm_to_unit_norm()
        total_variance = (x - x.mean(0)).pow(2).sum()
        out = self.coder(x=x, y=x, dead_mask=None, total_variance=total_variance)
        loss = out.fvu + 0.0 * out.auxk_loss + out.multi_topk_fvu / 8  # auxk_alpha has no dead latents to use
        loss.backward()
        self.coder.remove_gradient_parallel_to_decoder_directions()
        self.opt.step()
        self.opt.zero_grad()
        return out


def latent_l0(losses) -> float:
    """Mean non-zero latents per token of a step's StepLosses (its own l0() where it has one)."""
    if hasattr(losses, "l0"):
        return float(losses.l0())
    return float((losses.latents != 0).sum(1).float().mean())


def reference_losses(params: dict, xs, activation: str, k: int, l1_coeff: float, tau: float, selection=None):
    """float64 dense reference of SAEObjective.losses on rows xs: (loss, recon, penalty, x_hat, check).

    selection: None (no penalty) or the (rows, cols) of the pairs the penalty selected. The
    reference sums |C_ij|, C = fᵀf / B in float64, over exactly those pairs, and checks that they
    are a top-k of the float64 scores up to fp32 rounding (check: the worst score left out above
    the k-th selected, relative to the largest); so a near-tie at the k-th score, which fp32 and
    fp64 may order differently, does not read as a wrong gradient.
    """
    import torch
    from aosae.ops.gram_topk import k_for_fraction

    pre = (xs - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
    rows, n = pre.shape
    if activation == "topk":
        values, idx = pre.topk(k, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, idx, torch.relu(values))
    else:  # batchtopk: the rows·k largest pre-activations of the whole batch
        values, idx = pre.flatten().topk(rows * k)
        f = torch.zeros_like(pre).flatten().scatter(0, idx, torch.relu(values)).view(rows, n)
    x_hat = f @ params["W_dec"] + params["b_dec"]
    recon = (xs - x_hat).pow(2).sum(-1).mean()
    l1 = f.abs().sum(-1).mean()
    pen = torch.zeros((), dtype=pre.dtype)
    check = {}
    if selection is not None:  # C is non-zero only among the latents active in the batch
        active = (f != 0).any(0).nonzero().squeeze(1)
        fa = f[:, active]
        c = fa.t() @ fa
        pos = torch.full((n,), -1, dtype=torch.long)
        pos[active] = torch.arange(len(active))
        sel_r, sel_c = pos[selection[0]], pos[selection[1]]
        inside = (sel_r >= 0) & (sel_c >= 0)  # a pair outside the active latents has C = 0
        scores = c[sel_r[inside], sel_c[inside]].abs()
        pen = scores.sum() / rows
        with torch.no_grad():
            chosen = torch.zeros(len(active), len(active), dtype=torch.bool)
            chosen[sel_r[inside], sel_c[inside]] = True
            chosen[sel_c[inside], sel_r[inside]] = True
            upper = torch.ones_like(chosen).triu(1)
            left_out = c.abs()[upper & ~chosen]
            kth = float(scores.min()) if scores.numel() else 0.0
            top = float(c.abs()[upper].max()) if upper.any() else 1.0
            nonzero = int((c.abs()[upper] > 0).sum())
            check = {"selected": int(inside.sum()), "expected": min(k_for_fraction(n, FRACTION), nonzero),
                     "co_active_pairs": nonzero,
                     "left_out_above_kth": max(0.0, float(left_out.max()) - kth) / max(top, 1e-300) if left_out.numel() else 0.0}
    return recon + l1_coeff * l1 + tau * pen, recon, pen, x_hat, check


def rel_gap(got, want) -> float:
    scale = max(float(want.abs().max()), 1e-30)
    return float((got.double() - want).abs().max()) / scale


def run_check(args) -> dict:
    """The arm's step against the float64 reference on the same weights (and the same rows)."""
    import torch

    x = load_data(args.data)
    xs = batch_of(x, args.batch, args.seed, 0)[:CHECK_ROWS]
    if args.arm == "floor-encoder-gemm":
        w = torch.randn(args.d_in, args.width, generator=torch.Generator().manual_seed(args.seed))
        got = xs @ w
        return {"max_rel_gap": rel_gap(got, xs.double() @ w.double())}
    activation = "batchtopk" if "batchtopk" in args.arm else "topk"
    penalty = args.arm.endswith("+penalty")
    sae = make_aosae(args.d_in, args.width, activation, args.k, x, args.seed)
    params = {name: getattr(sae, name).detach().double().requires_grad_(True) for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    xs64 = xs.double()
    gaps, check_info = {}, None
    if args.arm == "sparsify-topk":
        coder = make_sparsify(sae)
        total_variance = (xs - xs.mean(0)).pow(2).sum()
        out = coder(x=xs, y=xs, dead_mask=None, total_variance=total_variance)
        (out.fvu + 0.0 * out.auxk_loss + out.multi_topk_fvu / 8).backward()
        loss_ref, recon_ref, _, x_hat_ref, _ = reference_losses(params, xs64, "topk", args.k, 0.0, 0.0)
        loss_ref.backward()
        gaps["reconstruction"] = rel_gap(out.sae_out.detach(), x_hat_ref.detach())
        # sparsify's loss is Σ‖e‖²/total_variance, the reference's Σ‖e‖²/rows: rescale its gradients
        scale = float(total_variance) / xs.shape[0]
        grads = {"W_enc": coder.encoder.weight.grad.t(), "b_enc": coder.encoder.bias.grad,
                 "W_dec": coder.W_dec.grad, "b_dec": coder.b_dec.grad}
        for name, g in grads.items():
            gaps[f"grad_{name}"] = rel_gap(g * scale, params[name].grad)
        gaps["loss"] = abs(float(out.fvu.detach()) * scale - float(recon_ref.detach())) / float(recon_ref.detach())
    else:
        obj = aosae_objective(sae, penalty)
        losses = obj.losses(xs)
        losses.loss.backward()
        selection = None
        if penalty:  # the pairs the penalty selected (padding, if any, has row -1)
            pairs = obj.ortho.last_pairs
            keep = pairs.rows >= 0
            selection = (pairs.rows[keep], pairs.cols[keep])
        loss_ref, _, pen_ref, _, sel_check = reference_losses(
            params, xs64, activation, args.k, L1_COEFF, obj.tau.tau, selection)
        loss_ref.backward()
        if penalty:
            gaps["selection_left_out_above_kth"] = sel_check.pop("left_out_above_kth")
            if sel_check["selected"] != sel_check["expected"]:
                gaps["selection_count"] = float("inf")
            check_info = sel_check
        gaps["loss"] = abs(float(losses.loss.detach()) - float(loss_ref.detach())) / abs(float(loss_ref.detach()))
        if penalty:
            gaps["penalty"] = abs(float(losses.penalty.detach()) - float(pen_ref.detach())) / max(abs(float(pen_ref.detach())), 1e-30)
        for name in params:
            gaps[f"grad_{name}"] = rel_gap(getattr(sae, name).grad, params[name].grad)
    worst = max(gaps.values())
    if not worst <= args.check_tol:
        raise AssertionError(f"{args.arm} at d_sae {args.width} disagrees with the float64 reference: {gaps}"
                             + (f" {check_info}" if check_info else ""))
    return {"max_rel_gap": worst, "gaps": gaps, **({"penalty_pairs": check_info} if check_info else {})}


def build_arm(args, x):
    """The arm's state and a function running one step on a batch; it returns a function that
    measures the step's L0 afterwards (outside the timed region), or None."""
    import torch

    if args.arm == "floor-encoder-gemm":
        w = torch.randn(args.d_in, args.width, generator=torch.Generator().manual_seed(args.seed))
        out = torch.empty(args.batch, args.width)

        def gemm(xb):
            torch.mm(xb, w, out=out)

        return gemm
    activation = "batchtopk" if "batchtopk" in args.arm else "topk"
    sae = make_aosae(args.d_in, args.width, activation, args.k, x, args.seed)
    if args.arm == "sparsify-topk":
        step = SparsifyStep(make_sparsify(sae))
        del sae

        def sparsify_step(xb):
            out = step(xb)
            return lambda: float((out.latent_acts != 0).sum(1).float().mean())

        return sparsify_step
    obj = aosae_objective(sae, args.arm.endswith("+penalty"))

    def aosae_step(xb):
        losses = obj.losses(xb)
        obj.optimizer_step(losses.loss)
        return lambda: latent_l0(losses)

    return aosae_step


def rss_mib(field: str = "VmRSS") -> float:
    """This process's resident memory now (VmRSS) or at its peak (VmHWM), MiB. Not ru_maxrss:
    that survives execve, so a worker would inherit the parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker(args) -> None:
    """Answers one JSON line per command read on stdin: init, step R, done (see Arm in the parent)."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printed (sparsify prints on import) goes to stderr
    if args.mem_cap_gib:
        cap = int(args.mem_cap_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    import torch

    torch.set_num_threads(args.threads)

    def reply(**kw):
        proto.write(json.dumps(kw) + "\n")

    x = load_data(args.data)
    if args.arm == "sparsify-topk":
        import_sparsify()  # its imports (transformers, accelerate) count in the baseline, not the step
    base = rss_mib()
    step = None
    for line in sys.stdin:
        cmd = line.split()
        try:
            if cmd[0] == "check":
                result = run_check(args)
                gc.collect()
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # VmHWM := VmRSS: the peak reported at "done" is the training's alone
                reply(check=result)
            elif cmd[0] == "init":
                step = build_arm(args, x)
                for i in range(args.trained_steps):  # untimed, on batches of their own: the step past the first ones
                    step(batch_of(x, args.batch, args.seed + 1, i))
                reply(ok=True, rss_after_init_mib=rss_mib())
            elif cmd[0] == "step":
                xb = batch_of(x, args.batch, args.seed, int(cmd[1]))
                t0 = time.perf_counter()
                measure = step(xb)
                t = time.perf_counter() - t0
                reply(t=t, l0=measure() if measure else None)
                del measure  # it holds the step's outputs: free them before the next step
            elif cmd[0] == "done":
                reply(peak_rss_mib=rss_mib("VmHWM"), baseline_rss_mib=base)
                return
        except Exception as e:  # noqa: BLE001
            reply(error=f"{type(e).__name__}: {e}"[:800])
            return


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
    moments); during a step: six [B, n] fp32 tensors (a dense TopK step's peak) and the co-active
    pairs of the penalty (value, row, col; a few copies)."""
    if name == "floor-encoder-gemm":
        return 0.4 + d_in * width * 4 / 2**30, batch * width * 4 / 2**30
    params = (2 * width * d_in + width + d_in) * 4
    pairs = batch * k * k // 2 * 24 if name.endswith("+penalty") else 0
    return 0.4 + 4 * params / 2**30, (6 * batch * width * 4 + 4 * pairs) / 2**30


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
    if not times:
        return {}
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    return {"median_s": statistics.median(times), "q1_s": q[0], "q3_s": q[2], "min_s": min(times), "max_s": max(times)}


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


def git_commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def sweep(args) -> list[dict]:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import machine

    arms = available(args)
    stamp = {"machine": machine.machine_name(), "versions": {**machine.versions(), "sparsify": sparsify_version()},
             "date": machine.today(), "threads": args.threads, "commit": git_commit(), "k": args.k,
             "optimizer": f"AdamW lr {LR} wd 0", "dtype": "float32", "l1_coeff": L1_COEFF, "fraction": FRACTION,
             "trained_steps": args.trained_steps}
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
    p.add_argument("--mem-budget-gib", type=float, default=14.0,
                   help="arms run interleaved (all alive at once) when their estimated memory fits in this")
    p.add_argument("--worker-cap-gib", type=float, default=18.0, help="address-space data cap of one worker")
    p.add_argument("--trained-steps", type=int, default=0,
                   help="untimed steps each arm trains first (its own objective, the same batches for every arm): "
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
