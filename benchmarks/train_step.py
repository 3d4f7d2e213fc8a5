"""SAE training step time with and without the orthogonality penalty, on real activations.

Arms alternate inside one process (with, without, without, with, ...) on the cached
activations of the default model (aosae.training.trainer.get_activations; collected once,
then reused). Every arm gets the same warm-up and the same number of timed rounds; each row
first checks the penalty path against a reference on a slice of the batch.

  step:      python benchmarks/train_step.py                     (d_sae 576 4608 16384 65536, relu + topk)
  backward:  python benchmarks/train_step.py --backward          (the penalty's backward at n=16384, B=2048, L0=20)
  example:   python benchmarks/train_step.py --example           (README's example: ortho(f) against ortho.on_support(f))

ReLU rows: an SAE at initialisation fires on ~half its latents; these rows model the trained
regime instead by lowering b_enc so each latent fires on ~relu_l0/n of the batch (the measured
L0 is in each row). The dense phase at initialisation is measured by dense_phase.py.
Rows go to benchmarks/results/train_step-<machine>.json (+ .png), the backward rows to
train_step-backward-<machine>.json, the example's to train_step-example-<machine>.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402

from aosae.nn.loss import TopKOrthoLoss  # noqa: E402
from aosae.nn.sae import SparseAutoencoder  # noqa: E402
from aosae.nn.tau import AdaptiveTau  # noqa: E402
from aosae.ops.backward import gram_topk_backward, gram_topk_sparse_backward  # noqa: E402
from aosae.ops.gram_topk import gram_topk, k_for_fraction  # noqa: E402
from aosae.ops.gram_topk_sparse import gram_topk_sparse  # noqa: E402
from aosae.ops.gram_topk_support import support_backward  # noqa: E402
from aosae.ops.backends import sparse as sparse_backend  # noqa: E402
from aosae.training import distributed as ddp  # noqa: E402
from aosae.training.config import TrainConfig, default_l1  # noqa: E402
from aosae.training.optimizer import make_optimizer  # noqa: E402
from aosae.training.step import SAEObjective  # noqa: E402
from aosae.training.trainer import get_activations  # noqa: E402


def load_activations(tokens: int) -> torch.Tensor:
    """Default model's activations [tokens, d_in], scaled to mean norm 1 like `aosae train`."""
    x, _ = get_activations(TrainConfig(tokens=tokens), ddp.DistInfo(0, 1, 0), "cpu", False)
    return x / x.norm(dim=1).mean()


def make_sae(d_in: int, d_sae: int, activation: str, top_k: int, relu_l0: int, x: torch.Tensor, seed: int):
    sae = SparseAutoencoder.from_dims(d_in, d_sae, activation=activation, top_k=top_k if activation == "topk" else None)
    torch.manual_seed(seed)
    sae.init_b_dec_(x[:4096], method="mean")
    if activation == "relu":  # each latent fires on ~relu_l0/n of the tokens (the trained regime)
        with torch.no_grad():
            pre = sae.pre_activations(x[:2048])
            rank = max(1, round(pre.shape[0] * relu_l0 / d_sae))
            sae.b_enc.sub_(pre.topk(rank, dim=0).values[-1])
    return sae


def objective(sae: SparseAutoencoder, penalty: bool) -> SAEObjective:
    opt = make_optimizer(sae.parameters(), 4e-4)  # the trainer's
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    l1 = default_l1(sae.cfg.activation)  # the trainer's: 0.04 with ReLU, 0 with TopK
    return SAEObjective(sae, opt, sched, l1, TopKOrthoLoss(0.005) if penalty else None, AdaptiveTau())


def check_penalty(sae: SparseAutoencoder, x: torch.Tensor) -> float:
    """The step's penalty path (sparse op for TopK, dense op + scatter backward for ReLU) against
    the dense op with the sparse.mm backward on 256 rows; returns the largest relative gap."""
    x = x[:256]
    out = sae(x)
    loss = TopKOrthoLoss(0.005)
    if out.topk_indices is not None:
        got = loss.from_topk(out.topk_indices, out.topk_values, sae.d_sae)
    else:
        got = loss(out.latents)
    (g_got,) = torch.autograd.grad(got, sae.W_enc)
    a = sae(x).latents
    k = k_for_fraction(sae.d_sae, 0.005)
    pairs = gram_topk(a.detach(), k, backend="sparse")
    want = pairs.values.abs().sum() / x.shape[0]
    grad_a = gram_topk_backward(torch.sign(pairs.values) / x.shape[0], a.detach(), *pairs, False, path="product")
    (g_want,) = torch.autograd.grad(a, sae.W_enc, grad_a)
    got = got.detach()
    gap = max(abs(float(got) - float(want)) / max(abs(float(want)), 1e-30),
              float((g_got - g_want).abs().max()) / max(float(g_want.abs().max()), 1e-30))
    if gap > 1e-3:
        raise AssertionError(f"penalty path disagrees with the reference (relative gap {gap:.2e})")
    return gap


def spread(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"median_s": statistics.median(times), "q1_s": q[0], "q3_s": q[2], "min_s": min(times), "max_s": max(times)}


def step_row(x, d_sae, activation, args) -> dict:
    batch = args.batch if d_sae < 65536 else args.batch_65536
    arms = {name: objective(make_sae(x.shape[1], d_sae, activation, args.top_k, args.relu_l0, x, args.seed), name == "with")
            for name in ("with", "without")}
    gap = check_penalty(arms["with"].sae, x)
    times = {"with": [], "without": []}
    l0 = []
    gen = torch.Generator().manual_seed(args.seed)
    for r in range(args.warmup + args.rounds):
        xb = x[torch.randint(0, x.shape[0], (batch,), generator=gen)]
        order = ("with", "without") if r % 2 == 0 else ("without", "with")
        for name in order:
            t0 = time.perf_counter()
            losses = arms[name].losses(xb)
            arms[name].optimizer_step(losses.loss)
            dt = time.perf_counter() - t0
            if r >= args.warmup:
                times[name].append(dt)
                if name == "with":
                    l0.append(float((losses.latents != 0).sum(1).float().mean()))
    ratios = [w / o for w, o in zip(times["with"], times["without"])]
    row = {"bench": "train_step", "d_sae": d_sae, "activation": activation, "batch": batch, "d_in": x.shape[1],
           "top_k": args.top_k if activation == "topk" else None, "l0": statistics.mean(l0),
           "fraction": 0.005, "warmup": args.warmup, "rounds": args.rounds, "check_rel_gap": gap,
           "with": spread(times["with"]), "without": spread(times["without"]), "ratio": spread(ratios),
           "threads": torch.get_num_threads(), "machine": machine.machine_name(), "versions": machine.versions(),
           "date": machine.today()}
    print(f"d_sae {d_sae:6d} {activation:4s} B {batch}  L0 {row['l0']:7.1f}  without {row['without']['median_s']*1e3:8.1f} ms"
          f"  with {row['with']['median_s']*1e3:8.1f} ms  ratio {row['ratio']['median_s']:.3f}"
          f" [{row['ratio']['q1_s']:.3f}, {row['ratio']['q3_s']:.3f}]", flush=True)
    return row


def backward_rows(x, args) -> list[dict]:
    """The penalty's backward at n = 16384, B = 2048, L0 = 20, fraction 0.005, on real latents."""
    n, batch, l0 = 16384, 2048, 20
    xb = x[:batch]
    k = k_for_fraction(n, 0.005)
    relu = make_sae(x.shape[1], n, "relu", None, l0, x, args.seed)
    topk = make_sae(x.shape[1], n, "topk", l0, l0, x, args.seed)
    with torch.no_grad():
        a = relu(xb).latents
        out = topk(xb)
    pairs = gram_topk(a, k)
    g = torch.sign(pairs.values)
    sp = gram_topk_sparse(out.topk_indices, out.topk_values, n, k)
    gs = torch.sign(sp.values)
    dense_topk = out.latents
    # reference checks before timing
    ref = gram_topk_backward(g, a, *pairs, False, path="product")
    torch.testing.assert_close(gram_topk_backward(g, a, *pairs, False, path="scatter"), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    ref_s = gram_topk_backward(gs, dense_topk, *sp, False, path="product").gather(1, out.topk_indices)
    torch.testing.assert_close(gram_topk_sparse_backward(gs, out.topk_indices, out.topk_values, *sp, n, False), ref_s,
                               rtol=1e-4, atol=1e-4 * float(ref_s.abs().max()))
    csr = sparse_backend.cpp_module().sparse_dense_to_csr(a)  # what gram_topk_on_support's forward saves
    on_support = support_backward(g, csr, pairs, a.shape, a.dtype, False)
    torch.testing.assert_close(on_support.to_dense()[a != 0], ref[a != 0], rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    arms = {
        "on support, sparse COO (ReLU latents)": lambda: support_backward(g, csr, pairs, a.shape, a.dtype, False),
        "dense op, scatter (ReLU latents)": lambda: gram_topk_backward(g, a, *pairs, False, path="scatter"),
        "dense op, sparse.mm (before)": lambda: gram_topk_backward(g, a, *pairs, False, path="product"),
        "sparse op (TopK indices, values)": lambda: gram_topk_sparse_backward(gs, out.topk_indices, out.topk_values, *sp, n, False),
        "floor: zeros_like([B, n])": lambda: torch.zeros_like(a),
    }
    times = {name: [] for name in arms}
    names = list(arms)
    for r in range(args.warmup + args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            arms[name]()
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    rows = []
    for name in names:
        row = {"bench": "penalty_backward", "arm": name, "n": n, "batch": batch, "l0": l0,
               "relu_l0_measured": float((a != 0).sum(1).float().mean()), "k": k, **spread(times[name]),
               "warmup": args.warmup, "rounds": args.rounds, "threads": torch.get_num_threads(),
               "machine": machine.machine_name(), "versions": machine.versions(), "date": machine.today()}
        print(f"{name:36s} median {row['median_s']*1e3:8.1f} ms  IQR [{row['q1_s']*1e3:.1f}, {row['q3_s']*1e3:.1f}]"
              f"  min/max [{row['min_s']*1e3:.1f}, {row['max_s']*1e3:.1f}]", flush=True)
        rows.append(row)
    return rows


def example_rows(x, args) -> list[dict]:
    """The README's plain-PyTorch example at n = 16384, B = 2048 on real ReLU latents (b_enc set for
    L0 20 on 2048 tokens; the row records the L0 measured on the batch, ≈ 10): the
    penalty's forward and backward through ortho(f) (a dense [B, n] gradient) and through
    ortho.on_support(f) (the gradient at f's non-zeros), arms alternating, each checked first."""
    n, batch, l0 = 16384, 2048, 20
    relu = make_sae(x.shape[1], n, "relu", None, l0, x, args.seed)
    with torch.no_grad():
        f = relu(x[:batch]).latents
    ortho = TopKOrthoLoss(0.005)

    def call(method: str):
        leaf = f.clone().requires_grad_()
        t0 = time.perf_counter()
        penalty = getattr(ortho, method)(leaf)
        t1 = time.perf_counter()
        penalty.backward()
        t2 = time.perf_counter()
        grad = leaf.grad.to_dense() if leaf.grad.is_sparse else leaf.grad
        return penalty.detach(), grad, t1 - t0, t2 - t1

    want, want_grad, *_ = call("forward")
    got, got_grad, *_ = call("on_support")
    support = f != 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(got_grad[support], want_grad[support], rtol=1e-4, atol=1e-4 * float(want_grad.abs().max()))
    names = {"ortho(f)": "forward", "ortho.on_support(f)": "on_support"}
    times = {(name, part): [] for name in names for part in ("forward", "backward")}
    order = list(names)
    for r in range(args.warmup + args.rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            _, _, fwd, bwd = call(names[name])
            if r >= args.warmup:
                times[(name, "forward")].append(fwd)
                times[(name, "backward")].append(bwd)
    rows = []
    for (name, part), ts in times.items():
        row = {"bench": "example_penalty", "arm": name, "part": part, "n": n, "batch": batch, "l0_target": l0,
               "l0_measured": float(support.sum(1).float().mean()), **spread(ts), "warmup": args.warmup,
               "rounds": args.rounds, "threads": torch.get_num_threads(), "machine": machine.machine_name(),
               "versions": machine.versions(), "commit": machine.git_commit(), "date": machine.today()}
        print(f"{name:22s} {part:8s} median {row['median_s']*1e3:8.1f} ms  IQR [{row['q1_s']*1e3:.1f}, "
              f"{row['q3_s']*1e3:.1f}]", flush=True)
        rows.append(row)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for activation in ("relu", "topk"):
        sel = sorted((r for r in rows if r["activation"] == activation), key=lambda r: r["d_sae"])
        if not sel:
            continue
        xs = [r["d_sae"] for r in sel]
        med = [r["ratio"]["median_s"] for r in sel]
        err = [[m - r["ratio"]["q1_s"] for m, r in zip(med, sel)], [r["ratio"]["q3_s"] - m for m, r in zip(med, sel)]]
        ax.errorbar(xs, med, yerr=err, marker="o", capsize=3, label=activation)
    ax.axhline(1.05, ls="--", c="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("d_sae")
    ax.set_ylabel("step time with / without penalty (median, IQR)")
    ax.set_title(f"{rows[0]['machine']}, {rows[0]['threads']} threads")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-sae", type=int, nargs="+", default=[576, 4608, 16384, 65536])
    p.add_argument("--activations", nargs="+", default=["relu", "topk"], choices=["relu", "topk"])
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--relu-l0", type=int, default=64, help="target L0 of the ReLU rows (b_enc lowered to reach it)")
    p.add_argument("--relu-max-d-sae", type=int, default=16384, help="skip ReLU rows above this d_sae")
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--batch-65536", type=int, default=512, help="batch at d_sae 65536 (memory and time on 2 cores)")
    p.add_argument("--tokens", type=int, default=30000)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backward", action="store_true", help="time the penalty's backward instead of whole steps")
    p.add_argument("--example", action="store_true", help="time the README example's penalty: ortho(f) against on_support")
    p.add_argument("--tag", default="", help="suffix of the output file names")
    args = p.parse_args()
    x = load_activations(args.tokens)
    name = machine.slug(machine.machine_name()) + (f"-{args.tag}" if args.tag else "")
    if args.backward:
        machine.write_rows(machine.RESULTS / f"train_step-backward-{name}.json", backward_rows(x, args))
        return
    if args.example:
        machine.write_rows(machine.RESULTS / f"train_step-example-{name}.json", example_rows(x, args))
        return
    rows = []
    out = machine.RESULTS / f"train_step-{name}.json"
    for d_sae in args.d_sae:
        for activation in args.activations:
            if activation == "relu" and d_sae > args.relu_max_d_sae:
                continue  # its outlier tokens (L0 ≈ n) send auto to the dense kernel: minutes per step here
            rows.append(step_row(x, d_sae, activation, args))
            machine.write_rows(out, rows)
    plot(rows, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
