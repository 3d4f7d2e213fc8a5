"""The worker side of benchmarks/width_sweep.py: one arm at one width in its own process.

Builds the arm (aosae's TopK / BatchTopK step with or without the penalty, sparsify's
SparseCoder, or the encoder product alone), checks it against a float64 dense reference on the
same weights, then takes steps when the parent asks (one command per line on stdin: check, init,
step R, done; one JSON reply per command on stdout) and reports its step times and peak RSS.
"""
from __future__ import annotations

import gc
import json
import os
import resource
import sys
import time

LR, FRACTION = 4e-4, 0.005  # λ: the trainer's default for the activation (aosae.training.config.default_l1)
CHECK_ROWS = 64  # rows of the float64 reference check (its penalty reference is dense over the active latents)


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
    from aosae.training.config import default_l1
    from aosae.training.optimizer import make_optimizer
    from aosae.training.step import SAEObjective

    opt = make_optimizer(sae.parameters(), LR)  # the trainer's
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    l1 = default_l1(sae.cfg.activation)
    return SAEObjective(sae, opt, sched, l1, TopKOrthoLoss(FRACTION) if penalty else None, AdaptiveTau())


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
    """One step of sparsify's trainer (sparsify/trainer.py, fvu loss, one micro-batch), with the
    AdamW of aosae's arms (torch's fused kernel): the same optimiser on both sides."""

    def __init__(self, coder):
        from aosae.training.optimizer import make_optimizer

        self.coder = coder
        self.opt = make_optimizer(coder.parameters(), LR)

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
            params, xs64, activation, args.k, obj.l1_coeff, obj.tau.tau, selection)
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

    def pretrain(xb):
        """An untimed step without the penalty: an arm with it and one without then time their
        steps from the same state (trained apart, their latents' layout differed more between the
        arms than the penalty costs; benchmarks/NOTES.md, eighth pass)."""
        ortho, obj.ortho = obj.ortho, None
        try:
            obj.optimizer_step(obj.losses(xb).loss)
        finally:
            obj.ortho = ortho

    aosae_step.pretrain = pretrain
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
                pretrain = getattr(step, "pretrain", step)
                for i in range(args.trained_steps):  # untimed, on batches of their own: the step past the first ones
                    pretrain(batch_of(x, args.batch, args.seed + 1, i))
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
