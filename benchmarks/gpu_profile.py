"""Where the GPU time goes, kernel by kernel (torch.profiler), for the rows the suite says are slow:
the trainer's TopK step with and without the penalty, gram_topk_sparse forward + backward on TopK
latents, and the dense Triton op. Each workload is warmed up, then profiled over a few calls; the
table lists the kernels by total device time, with the host syncs (device-to-host copies and
synchronize calls, item()) counted, since a sync drains the queue the next kernels would have hidden in.

    python benchmarks/gpu_profile.py --out $OUT/profile.txt      # H100/H200: ≈ 40 s
    TRITON_INTERPRET=1 python benchmarks/gpu_profile.py --device cpu --out /tmp/p.txt   # dry run
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_gram_topk import import_aosae  # noqa: E402

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

# calls that can stall the host: synchronize, every async copy (device-to-host ones wait), item()
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "aten::item", "aten::_local_scalar_dense")


def report(name: str, fn, calls: int, cuda: bool, lines: list[str], top: int = 22) -> None:
    for _ in range(3):
        fn()
    if cuda:
        torch.cuda.synchronize()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) * 1e3 / calls
    events = prof.key_averages()
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    # (a user annotation such as Optimizer.step#…, on the device timeline too, spans kernels listed already)
    kernels = sorted((e for e in events if getattr(e, attr, 0) > 0 and not e.is_user_annotation
                      and (not cuda or e.device_type.name == "CUDA")), key=lambda e: -getattr(e, attr))
    device_ms = sum(getattr(e, attr) for e in kernels) / 1e3 / calls
    syncs = {e.key: e.count // calls for e in events if e.key in SYNCS}
    lines.append(f"\n== {name}: wall {wall:.3f} ms/call, device {device_ms:.3f} ms/call, per call: {syncs}")
    for e in kernels[:top]:
        lines.append(f"{getattr(e, attr) / 1e3 / calls:9.3f} ms {e.count // calls:5d}x  {e.key[:110]}")
    print("\n".join(lines[-(min(top, len(kernels)) + 1):]), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if not cuda:
        import os
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["AOSAE_SPARSE_TRITON"] = "1"
    aosae = import_aosae()
    from gpu_checks import coding_latents, gaussian, topk_input
    from gpu_sparse_step import make_objective
    from gpu_suite import config

    cfg = config(SimpleArgs(args.device))
    lines = [f"{torch.cuda.get_device_name() if cuda else 'cpu'}; torch {torch.__version__}"]
    g = torch.Generator(device=cfg.device).manual_seed(0)
    x = torch.randn(cfg.B, cfg.d_in, generator=g, device=cfg.device)
    x = x / x.norm(dim=1).mean()
    for d_sae in cfg.d_sae:
        for penalty in (True, False):
            obj = make_objective(cfg, d_sae, "topk", x, penalty)

            def step(obj=obj):
                losses = obj.losses(x)
                obj.optimizer_step(losses.loss)
            report(f"trainer TopK step d_sae {d_sae}, penalty {penalty}", step, 5, cuda, lines)
            del obj
    n = cfg.d_sae[-1]
    idx, vals, _ = topk_input(cfg, n, cfg.check_l0, "bf16", seed=1)
    k = aosae.k_for_fraction(n, 0.005)

    def sparse_op():
        v = vals.detach().requires_grad_(True)
        out = aosae.gram_topk_sparse(idx, v, n, k)
        out.values.abs().sum().backward()
    report(f"gram_topk_sparse fwd+bwd n {n} L0 {cfg.check_l0} bf16", sparse_op, 5, cuda, lines)
    a = gaussian(cfg, cfg.t_tri_n, "bf16", seed=2)
    kt = aosae.k_for_fraction(cfg.t_tri_n, 0.005)
    hint = float(aosae.gram_topk(gaussian(cfg, cfg.t_tri_n, "bf16", seed=3), kt, backend="triton").values.abs()[-1])
    report(f"gram_topk triton n {cfg.t_tri_n} bf16, warm", lambda: aosae.gram_topk(
        a, kt, backend="triton", threshold=torch.tensor(hint)), 5, cuda, lines)
    from aosae.ops.backends import sparse_coding_triton as sct
    from aosae.ops.sparse_coding import group_by, token_of_entry

    lat, w = coding_latents(cfg, n, cfg.top_k, seed=4)
    order, off = group_by(lat.reshape(-1), n)  # the entries by latent, as the step's backward groups them
    rows = token_of_entry(torch.arange(cfg.B + 1, device=cfg.device) * cfg.top_k, lat.numel())[order]
    G = torch.randn(cfg.B, cfg.d_in, generator=g, device=cfg.device).to(torch.bfloat16)
    wg = w.reshape(-1)[order]
    report(f"W_dec grad n {n} bf16 (segment_gather_sum)", lambda: sct.segment_gather_sum(off, rows, wg, G), 5, cuda,
           lines, top=4)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


class SimpleArgs:
    """The suite's config() arguments: full sizes on CUDA, tiny under the interpreter."""

    def __init__(self, device: str):
        self.device, self.quick, self.reps = device, True, None


if __name__ == "__main__":
    sys.exit(main())
