"""Which latents a sparse SAE keeps: pre-activations -> CSR rows (offsets, indices, values).

`select` reads the dense pre-activations [B, n] (TopK, BatchTopK, ReLU, JumpReLU); `tiled_topk`
finds TopK's kept latents from column tiles of the encoder's product without writing them. Called
by aosae.ops.sparse_coding's encoder; rows list their latents in ascending order.
"""
from __future__ import annotations

import threading
from typing import Optional

import torch

from aosae.ops import extension
from aosae.ops.batch_top import batch_top, entries_above

ENCODE_ACTIVATIONS = ("relu", "topk", "batchtopk", "jumprelu")
# TopK on CPU: the encoder's product in column tiles of at most this many latents, each tile's top k
# merged into the running one, so the [B, n] pre-activations are never written. The product and
# top-k took 0.83× the untiled time at 65536 and 0.85× at 262144, in 256 MiB instead of 0.5–2 GiB
# (B 2048, d_in 576; benchmarks/NOTES.md, thirtieth pass). At or below it: one tile, one product.
TOPK_TILE = 32768


def offsets_of(keys: torch.Tensor, n_groups: int) -> torch.Tensor:
    """CSR offsets [n_groups+1] of entries grouped by key (int64 keys in [0, n_groups))."""
    offsets = keys.new_zeros(n_groups + 1, dtype=torch.long)
    offsets[1:] = torch.bincount(keys, minlength=n_groups).cumsum(0)
    return offsets


@torch.no_grad()
def select(pre: torch.Tensor, activation: str, k: Optional[int] = None, threshold=None):
    """Pre-activations [B, n] -> (offsets [B+1], indices [nnz], values [nnz]) of the kept latents.

    "topk": the k largest per row (ReLU'd: a kept slot may hold 0), fixed offsets = arange·k.
    "batchtopk": the B·k largest of the whole batch that are > 0 (ragged rows, SAELens's
    BatchTopK). "relu": every entry > 0. "jumprelu": every entry > max(threshold, 0) (threshold
    a float, a 0-d tensor or one per latent): BatchTopK's inference form.
    Every row lists its latents in ascending order.
    """
    b, n = pre.shape
    if activation == "topk":
        return topk_rows(*pre.topk(k, dim=1, sorted=False))
    if activation == "batchtopk":
        # top B·k of pre itself: its positive entries are those of the top B·k of relu(pre)
        flat = batch_top(pre.reshape(-1), min(b * k, b * n))
        flat = flat[pre.reshape(-1)[flat] > 0].sort().values  # row-major: rows, then latents ascending
        rows, indices = flat // n, flat % n
    elif activation == "relu":
        return positive_rows(pre)
    elif activation == "jumprelu":
        mask = (pre > 0) & (pre > torch.as_tensor(threshold, dtype=pre.dtype, device=pre.device))
        rows, indices = mask.nonzero(as_tuple=True)
        flat = rows * n + indices
    else:
        raise ValueError(f"activation must be one of {ENCODE_ACTIVATIONS}, got {activation!r}")
    return offsets_of(rows, b), indices, pre.reshape(-1)[flat]


@torch.no_grad()
def positive_rows(pre: torch.Tensor, max_nnz: Optional[int] = None):
    """ReLU's kept latents, as select(pre, "relu") returns them, without a [B, n] mask on CPU
    (batch_top.entries_above); None as soon as more than max_nnz entries are positive (a ReLU SAE's
    dense phase)."""
    b, n = pre.shape
    flat = entries_above(pre.reshape(-1), 0, max_nnz)
    if flat is None:
        return None
    rows = flat // n
    return offsets_of(rows, b), flat - rows * n, pre.reshape(-1)[flat]


def topk_rows(values: torch.Tensor, indices: torch.Tensor, ascending: bool = False):
    """A TopK selection [B, k] (values, indices; ascending=True: latents already ascending in each
    row, else in any order) as CSR rows: latents ascending (as topk's own sort by value cost: the
    penalty's rows then need no permutation), values ReLU'd (the inputs are not changed)."""
    b, k = indices.shape
    if not ascending:
        values, indices = _by_latent(values, indices)
    offsets = torch.arange(b + 1, device=indices.device) * k
    return offsets, indices.reshape(-1), values.relu().reshape(-1)


def _by_latent(values: torch.Tensor, indices: torch.Tensor):
    """(values, indices) [B, k] with each row's latents in ascending order."""
    indices, order = indices.sort(dim=1)
    return values.gather(1, order), indices


_kept = threading.local()  # this thread's product tile, kept between calls (tiled_topk)
KEPT_TILE_BYTES = 2 << 30  # the largest tile kept: BatchTopK's and ReLU's whole [B, n], B 2048 × 262144 in float32


def tile_buffer(rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    """A [rows, cols] buffer for tiled_topk's product tiles (and for BatchTopK's and ReLU's whole
    pre-activations, aosae.ops.sparse_coding). On CPU, up to KEPT_TILE_BYTES, it is kept between
    calls of this thread: a fresh 128 MiB each training step cost ≈ 60 ms of first-touch page
    faults at d_sae 16384, B 2048 (benchmarks/NOTES.md, thirty-first pass). One per thread; another
    shape or dtype replaces it, release_tile_buffer() frees it. Larger tiles and other devices get
    a fresh buffer. Nothing its callers return is a view of it."""
    if like.device.type != "cpu" or rows * cols * like.element_size() > KEPT_TILE_BYTES:
        return like.new_empty(rows, cols)
    buf = getattr(_kept, "buf", None)
    if buf is None or buf.shape != (rows, cols) or buf.dtype != like.dtype:
        _kept.buf = None  # (the old one freed before the new one is allocated)
        with torch.inference_mode(False):  # (made under inference mode, it could not be written outside it)
            buf = _kept.buf = torch.empty(rows, cols, dtype=like.dtype)
    return buf


def release_tile_buffer() -> None:
    """Frees this thread's kept product tile (tile_buffer), e.g. after training in a long-lived process."""
    _kept.buf = None


def _row_topk_kernel(*tensors: torch.Tensor):
    """aosae._C where its row_topk runs on these tensors (float32 on CPU), else None."""
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors):
        return None
    module, _ = extension.load()
    return module if module is not None and hasattr(module, "row_topk") else None


@torch.no_grad()
def tiled_topk(centered: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int, tile: int = TOPK_TILE,
               buf: Optional[torch.Tensor] = None, *, kernel: bool = True):
    """The k largest of centered @ W_enc + b_enc per row, (values, indices) [B, k] with each row's
    latents ascending, without the [B, n] pre-activations: the product's column tiles go through
    one [B, tile] buffer (`buf`, or this thread's kept one: tile_buffer), and each tile's top k is
    merged into the running one. The same k values per row as the product's topk (each tile's
    entries are the same dot products, up to the GEMM's blocking in the last bits).

    In float32 on CPU the tile is a plain product and the C++ row_topk adds the bias as it reads it
    (csrc/row_topk.cpp: addmm's broadcast copy of the bias and torch.topk cost 5× its time at d_sae
    16384); ties then go to the smaller latent. Elsewhere, or with kernel=False (the baseline that
    benchmarks/encoder_topk_fusion.py times): addmm and torch.topk, ties either way."""
    b, n = centered.shape[0], W_enc.shape[1]
    buf = tile_buffer(b, min(tile, n), centered) if buf is None else buf
    cpp = _row_topk_kernel(centered, W_enc, b_enc, buf) if kernel else None
    best_v = best_i = None
    for s in range(0, n, tile):
        e = min(n, s + tile)
        if cpp is not None:  # each tile's rows come back ascending, past the running ones'
            part = torch.mm(centered, W_enc[:, s:e], out=buf[:, : e - s])
            v, i = cpp.row_topk(part, b_enc[s:e], min(k, e - s))
        else:
            part = torch.addmm(b_enc[s:e], centered, W_enc[:, s:e], out=buf[:, : e - s])
            v, i = part.topk(min(k, e - s), dim=1, sorted=False)
        i += s
        if best_v is None:
            best_v, best_i = v, i
            continue
        v, i = torch.cat([best_v, v], 1), torch.cat([best_i, i], 1)
        if cpp is not None:  # (positions in order: latents stay ascending, ties to the smaller)
            best_v, j = cpp.row_topk(v, None, min(k, v.shape[1]))
        else:
            best_v, j = v.topk(min(k, v.shape[1]), dim=1, sorted=False)
        best_i = i.gather(1, j)
    return (best_v, best_i) if cpp is not None else _by_latent(best_v, best_i)
