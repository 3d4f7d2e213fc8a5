"""Which latents a sparse SAE keeps: pre-activations -> CSR rows (offsets, indices, values).

`select` reads the dense pre-activations [B, n] (TopK, BatchTopK, ReLU, JumpReLU); `tiled_topk`
finds TopK's kept latents from column tiles of the encoder's product without writing them. Called
by aosae.ops.sparse_coding's encoder; rows list their latents in ascending order.
"""
from __future__ import annotations

from typing import Optional

import torch

from aosae.ops.batch_top import batch_top

ENCODE_ACTIVATIONS = ("relu", "topk", "batchtopk", "jumprelu")
# TopK on CPU wider than this: the encoder's product in column tiles of this many latents, each
# tile's top k merged into the running one, so the [B, n] pre-activations are never written. The
# product and top-k took 0.83× the untiled time at 65536 and 0.85× at 262144, in 256 MiB instead of
# 0.5–2 GiB (B 2048, d_in 576; benchmarks/NOTES.md, thirtieth pass). At or below it: one product.
TOPK_TILE = 32768


def offsets_of(keys: torch.Tensor, n_groups: int) -> torch.Tensor:
    """CSR offsets [n_groups+1] of entries grouped by key (int64 keys in [0, n_groups))."""
    offsets = keys.new_zeros(n_groups + 1, dtype=torch.long)
    offsets[1:] = torch.bincount(keys, minlength=n_groups).cumsum(0)
    return offsets


@torch.no_grad()
def select(pre: torch.Tensor, activation: str, k: Optional[int] = None, threshold=None, *,
           positive: Optional[torch.Tensor] = None):
    """Pre-activations [B, n] -> (offsets [B+1], indices [nnz], values [nnz]) of the kept latents.

    "topk": the k largest per row (ReLU'd: a kept slot may hold 0), fixed offsets = arange·k.
    "batchtopk": the B·k largest of the whole batch that are > 0 (ragged rows, SAELens's
    BatchTopK). "relu": every entry > 0. "jumprelu": every entry > max(threshold, 0) (threshold
    a float, a 0-d tensor or one per latent): BatchTopK's inference form.
    Every row lists its latents in ascending order. positive: pre > 0, when the caller has it already.
    """
    b, n = pre.shape
    if activation == "topk":
        return topk_rows(*pre.topk(k, dim=1, sorted=False))
    if activation == "batchtopk":
        # top B·k of pre itself: its positive entries are those of the top B·k of relu(pre)
        flat = batch_top(pre.reshape(-1), min(b * k, b * n))
        flat = flat[pre.reshape(-1)[flat] > 0].sort().values  # row-major: rows, then latents ascending
        rows, indices = flat // n, flat % n
    elif activation in ("relu", "jumprelu"):
        mask = pre > 0 if positive is None else positive
        if activation == "jumprelu":
            mask = mask & (pre > torch.as_tensor(threshold, dtype=pre.dtype, device=pre.device))
        rows, indices = mask.nonzero(as_tuple=True)
        flat = rows * n + indices
    else:
        raise ValueError(f"activation must be one of {ENCODE_ACTIVATIONS}, got {activation!r}")
    return offsets_of(rows, b), indices, pre.reshape(-1)[flat]


def topk_rows(values: torch.Tensor, indices: torch.Tensor):
    """A TopK selection [B, k] (values, indices, in any order) as CSR rows: latents ascending (as
    topk's own sort by value cost: the penalty's rows then need no permutation), values ReLU'd."""
    b, k = indices.shape
    indices, order = indices.sort(dim=1)
    offsets = torch.arange(b + 1, device=indices.device) * k
    return offsets, indices.reshape(-1), values.gather(1, order).relu_().reshape(-1)


@torch.no_grad()
def tiled_topk(centered: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int, tile: int = TOPK_TILE,
               buf: Optional[torch.Tensor] = None):
    """The k largest of centered @ W_enc + b_enc per row, (values, indices) [B, k] in no order,
    without the [B, n] product: its column tiles go through one [B, tile] buffer (`buf`, or a fresh
    one), and each tile's top k is merged into the running one. The same k values per row as the
    product's topk (each tile's entries are the same dot products, up to the GEMM's blocking in the
    last bits); among tied values either may be kept."""
    b, n = centered.shape[0], W_enc.shape[1]
    buf = centered.new_empty(b, min(tile, n)) if buf is None else buf
    best_v = best_i = None
    for s in range(0, n, tile):
        e = min(n, s + tile)
        part = torch.addmm(b_enc[s:e], centered, W_enc[:, s:e], out=buf[:, : e - s])
        v, i = part.topk(min(k, e - s), dim=1, sorted=False)
        i += s
        if best_v is None:
            best_v, best_i = v, i
        else:
            best_v, j = torch.cat([best_v, v], 1).topk(min(k, best_v.shape[1] + v.shape[1]), dim=1, sorted=False)
            best_i = torch.cat([best_i, i], 1).gather(1, j)
    return best_v, best_i
