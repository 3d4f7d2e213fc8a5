"""Gradient of the selected Gram entries with respect to the input, never dense n × n.

For dot similarity v_p = a[:, r_p] · a[:, c_p], so with upstream grads g_p

    ∂L/∂a = a · G,   G symmetric sparse n × n,  G[r_p, c_p] = G[c_p, r_p] = g_p.

For cosine v_p = â_r · â_c with â = a / ‖a‖ (per column):

    ∂L/∂a = (â · G − â ⊙ u) / ‖a‖,   u_i = Σ_{p ∋ i} g_p v_p.

G has 2k non-zeros; the product costs O(m · k) and O(m · n) memory.
"""
from __future__ import annotations

import torch

from aosae.ops.conventions import accumulation_dtype, column_norms


def gram_topk_backward(
    grad_values: torch.Tensor,
    a: torch.Tensor,
    values: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    cosine: bool,
) -> torch.Tensor:
    """grad_values [k], a [m, n], values/rows/cols [k] -> grad_a [m, n] in a's dtype."""
    m, n = a.shape
    acc = accumulation_dtype(a.dtype)
    valid = rows >= 0  # empty slots (index -1) carry no gradient
    r, c = rows[valid], cols[valid]
    g = grad_values[valid].to(acc)
    x = a.to(acc)
    if cosine:
        norms = column_norms(x).clamp_min(torch.finfo(acc).tiny)
        x = x / norms
    if r.numel() == 0:
        return torch.zeros_like(a)
    index = torch.stack([torch.cat([r, c]), torch.cat([c, r])])
    gmat = torch.sparse_coo_tensor(index, torch.cat([g, g]), (n, n), check_invariants=False).coalesce()
    grad_t = torch.sparse.mm(gmat, x.t().contiguous())  # [n, m] = G · xᵀ = (x · G)ᵀ
    grad = grad_t.t()
    if cosine:
        gv = g * values[valid].to(acc)
        u = torch.zeros(n, dtype=acc, device=a.device).index_add_(0, r, gv).index_add_(0, c, gv)
        grad = (grad - x * u) / norms
    return grad.to(a.dtype).contiguous()
