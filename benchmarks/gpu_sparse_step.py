"""The training-step sections of benchmarks/gpu_suite.py: the trainer's objective as `aosae train`
builds it (sections 3 and 6), and section 6, the sparse SAE step on GPU: its Triton primitives
(decode, W gradient, value gradient) against float64, torch and their memory floor, then the TopK
step built on aosae.ops.sparse_coding against sparsify's SparseCoder and the trainer's TopK and
BatchTopK steps. `S` is the suite's Suite (its cfg, doc, clock and time_arms)."""
from __future__ import annotations

import os
import statistics
from functools import partial

import torch

from gpu_checks import DT, attempt, coding_check, coding_latents, swapped
from gpu_gram_topk import skip_reason as reason
from width_arms import aosae_objective


def make_objective(cfg, d_sae, activation, x, penalty: bool):
    from aosae.nn.sae import SparseAutoencoder

    torch.manual_seed(0)  # both arms start from the same weights
    with torch.device(cfg.device):  # initialised on the GPU: 151 M weights at d_sae 65536 take seconds on the CPU
        sae = SparseAutoencoder.from_dims(cfg.d_in, d_sae, activation=activation,
                                          top_k=cfg.top_k if activation in ("topk", "batchtopk") else None)
    sae.init_b_dec_(x[:4096], method="mean")
    if activation == "relu":  # lower b_enc: each latent fires on ~top_k/n of the tokens (as benchmarks/train_step.py)
        with torch.no_grad():
            pre = sae.pre_activations(x[:2048])
            sae.b_enc.sub_(pre.topk(max(1, round(pre.shape[0] * cfg.top_k / d_sae)), dim=0).values[-1])
    return aosae_objective(sae, penalty)  # the width sweep's: the trainer's optimiser and λ, fraction 0.005


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
    from aosae.ops.sparse_coding import group_by, token_of_entry

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
    rows = token_of_entry(offsets, nnz)
    order, lat_off = group_by(flat, n)  # the entries by latent, as the step's backward groups them
    counts = lat_off[1:] - lat_off[:-1]
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
    with swapped(module, "SEGMENT_CONFIG", config):
        return fn()


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
