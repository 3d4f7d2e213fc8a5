"""Inputs and correctness checks of benchmarks/gpu_suite.py: every result against float64 (sampled
pairs, and a slab of rows where nothing may beat the k-th |score| unless returned) and against the
reference backend (pairs up to near-ties, |values|, gradients)."""
from __future__ import annotations

import contextlib

import torch

from gpu_gram_topk import skip_reason

DTYPES = ("bf16", "fp16", "fp32")
VALUE_RTOL = 1e-4  # scores accumulate in fp32 whatever the input: error relative to the largest score
GRAD_RTOL = {"bf16": 1.6e-2, "fp16": 2e-3, "fp32": 1e-4}  # gradients come back in the input dtype


def gaussian(cfg, n, dtype, seed):
    g = torch.Generator(device=cfg.device).manual_seed(seed)
    return torch.randn(cfg.B, n, generator=g, device=cfg.device).to(getattr(torch, DT[dtype]))


DT = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def topk_input(cfg, n, l0, dtype, seed):
    """TopK-like [B, L0] (indices, values): latent i drawn with weight ∝ 1/(i + 50)^0.8 (Gumbel
    top-k = sampling without replacement), so pairs repeat across rows as in a trained SAE."""
    g = torch.Generator(device=cfg.device).manual_seed(seed)
    logw = -0.8 * torch.log(torch.arange(n, device=cfg.device, dtype=torch.float32) + 50)
    idx = torch.cat([torch.topk(logw - torch.log(-torch.log(torch.rand(min(512, cfg.B - t), n, generator=g,
                     device=cfg.device).clamp_min_(1e-12))), l0, dim=1).indices for t in range(0, cfg.B, 512)])
    vals = (torch.rand(cfg.B, l0, generator=g, device=cfg.device) + 0.05).to(getattr(torch, DT[dtype]))
    return idx, vals, torch.zeros(cfg.B, n, dtype=vals.dtype, device=cfg.device).scatter_(1, idx, vals)


def call(name, a, k, sim="dot", grad=False, sparse=None, hint=None, backward=None):
    """One op call: a gram_topk backend, or "gram_topk_sparse" on sparse = (indices, values). With
    grad, also d(Σ|values|)/d(input) (a, or the values for gram_topk_sparse); backward: the dense
    input's gradient path forced ("product", "expand"; None: aosae.ops.backward.backward_path's)."""
    import aosae  # imported by the suite first (from this tree, after TRITON_INTERPRET is set)
    from aosae.ops import backward as bw

    if backward is not None:
        with swapped(bw, "backward_path", lambda *args: backward):
            return call(name, a, k, sim, grad, sparse, hint)

    if name == "gram_topk_sparse":
        x = sparse[1].detach().requires_grad_(grad)
        pairs = aosae.gram_topk_sparse(sparse[0], x, a.shape[1], k, similarity=sim)
    else:
        x = a.detach().requires_grad_(grad)
        pairs = aosae.gram_topk(x, k, similarity=sim, backend=name, threshold=None if hint is None else torch.tensor(hint))
    g = torch.autograd.grad(pairs.values.abs().sum(), x)[0] if grad else None
    return tuple(t.detach() for t in pairs), g


def check_exact(cfg, a, pairs, cosine) -> dict:
    """pairs against float64, without the n × n matrix: structure, sampled values (the k-th always
    among them), and a slab of random rows i where no (i, j > i) beats the k-th unless returned."""
    vals, rows, cols = pairs
    n, fill = a.shape[1], rows >= 0
    v, r, c = vals[fill], rows[fill], cols[fill]
    absv, ids = v.abs(), r * n + c
    scale = max(float(absv.max()) if v.numel() else 0.0, 1e-30)
    inv = 1 / torch.linalg.vector_norm(a, dim=0, dtype=torch.float64).clamp_min(1e-300) if cosine else None
    pick = torch.cat([torch.randperm(v.numel(), device=a.device)[: cfg.sample],
                      torch.arange(v.numel() - 1, v.numel(), device=a.device)]).clamp_min(0)[: v.numel()]
    exact = (a[:, r[pick]].double() * a[:, c[pick]].double()).sum(0)
    exact = exact * inv[r[pick]] * inv[c[pick]] if cosine else exact
    err = float((v[pick].double() - exact).abs().max()) if v.numel() else 0.0
    kth = float(absv[-1]) if bool(fill.all()) else 0.0  # not full: every non-zero pair must be there
    slab = torch.randperm(n, device=a.device)[: cfg.slab]
    left, missed = a[:, slab].double(), 0
    for j0 in range(0, n, 8192):  # [slab, 8192] float64 blocks
        j = torch.arange(j0, min(n, j0 + 8192), device=a.device)
        s = left.t() @ a[:, j0:j0 + 8192].double()
        s = s * inv[slab, None] * inv[None, j] if cosine else s
        ii, jj = ((s.abs() > kth + VALUE_RTOL * scale) & (j[None, :] > slab[:, None])).nonzero(as_tuple=True)
        missed += int((~torch.isin(slab[ii] * n + j[jj], ids)).sum())
    structure = (bool((r < c).all()) and ids.unique().numel() == ids.numel() and bool((absv[:-1] >= absv[1:]).all())
                 and bool((vals[~fill] == 0).all()) and bool((cols[~fill] == -1).all()))
    return dict(exact_abs_err=err, exact_rel_err=err / scale, slab_missed=missed, structure_ok=structure,
                filled=int(fill.sum()), ok=structure and err <= VALUE_RTOL * scale and missed == 0)


def against_ref(got, ref, n, g=None, g_ref=None, dtype=None, idx=None) -> dict:
    """|values| against the reference's; pairs (only near-ties with the k-th may differ); the gradient
    on the columns that no differing pair touches (idx: gram_topk_sparse's [B, L] indices)."""
    rv, scale = ref[0].abs(), max(float(ref[0].abs().max()), 1e-30)
    gid, rid = got[1] * n + got[2], ref[1] * n + ref[2]
    only_got, only_ref = gid[~torch.isin(gid, rid)], rid[~torch.isin(rid, gid)]
    err = float((got[0].abs() - rv).abs().max())
    near = int((rv <= float(rv[-1]) + 2 * VALUE_RTOL * scale).sum())
    out = dict(ref_abs_err=err, ref_rel_err=err / scale, pairs_differ=only_got.numel(),
               ok=err <= VALUE_RTOL * scale and only_got.numel() <= near)
    if g is not None and g_ref is not None:
        diff = torch.cat([only_got, only_ref])
        keep = torch.ones(n, dtype=torch.bool, device=g.device)
        keep[diff[diff >= 0] // n], keep[diff[diff >= 0] % n] = False, False
        if idx is not None:  # d/dvalues = the dense gradient at the indices
            g_ref, mask = g_ref.gather(1, idx), keep[idx]
        else:
            mask = keep[None, :].expand_as(g)
        gap = (g.float() - g_ref.float()).abs()[mask]
        rel = float(gap.max()) / max(float(g_ref.float().abs().max()), 1e-30) if gap.numel() else 0.0
        out.update(grad_abs_err=float(gap.max()) if gap.numel() else 0.0, grad_rel_err=rel,
                   grad_ok=rel <= GRAD_RTOL[dtype], ok=out["ok"] and rel <= GRAD_RTOL[dtype])
    return out


def checked(cfg, a, got, ref, cosine=False, **grads) -> dict:
    row = check_exact(cfg, a, got, cosine)
    cmp = against_ref(got, ref, a.shape[1], **grads) if ref is not None else {"ok": True}
    return {**row, **cmp, "ok": row["ok"] and cmp["ok"]}


def ref_skip(cfg, n):
    if n > cfg.ref_max_n:
        return (f"reference materialises n×n fp32 twice ({8 * n * n / 2**30:.0f} GiB) and a topk over n² entries: "
                f"not run above n = {cfg.ref_max_n}; results checked against float64 instead")


# ---- the sparse SAE step's primitives (section 6) ------------------------------------------------

def coding_latents(cfg, n, k, seed):
    """TopK latents as a trained SAE has them, without a dense [B, n]: (indices [B, k] int64 distinct
    per row, latent i drawn ∝ 1/(i + 50)^0.8 as topk_input, so a few latents fire on much of the
    batch: ragged segments for the W gradients), values [B, k] fp32 in (0.05, 1.05)."""
    g = torch.Generator(device=cfg.device).manual_seed(seed)
    logw = -0.8 * torch.log(torch.arange(n, device=cfg.device, dtype=torch.float32) + 50)
    idx = torch.cat([torch.topk(logw - torch.log(-torch.log(torch.rand(min(512, cfg.B - t), n, generator=g,
                     device=cfg.device).clamp_min_(1e-12))), k, dim=1).indices for t in range(0, cfg.B, 512)])
    return idx, torch.rand(cfg.B, k, generator=g, device=cfg.device) + 0.05


def coding_check(got, want, bound) -> dict:
    """A primitive's fp32 result against float64: |got − want| ≤ bound elementwise, bound = the
    recursive-summation error (terms + 2)·2⁻²⁴·Σ|terms| of an fp32 accumulation of exact inputs."""
    gap = (got.double() - want).abs()
    worst = float((gap / bound.clamp_min(1e-300)).max()) if gap.numel() else 0.0
    return dict(abs_err=float(gap.max()) if gap.numel() else 0.0, err_over_bound=worst,
                fp32_out=got.dtype == torch.float32, ok=bool((gap <= bound).all()) and got.dtype == torch.float32)


@contextlib.contextmanager
def swapped(module, name: str, value):
    """module.name is value inside the block (a forced path or launch configuration), restored after."""
    kept = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, kept)


def attempt(fn):
    """(fn(), None), or (None, why) when it raises: one failing arm must not cost the others of its row."""
    try:
        return fn(), None
    except Exception as err:
        return None, skip_reason(err)
