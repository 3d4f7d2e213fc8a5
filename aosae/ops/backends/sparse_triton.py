"""Host side of the sparse path on GPU, around the Triton kernels of aosae.kernels.sparse_pairs.

    CSR rows -> every co-active pair's key and product, at a fixed slot  (_emit_kernel)
    -> sort the keys (CUB radix sort via torch.sort; stable, so runs stay in row order)
    -> sum each run of equal keys, score it                              (_reduce_kernel)
    -> sort the scores' selection keys, keep the first k.

Work O(Σ_t L0_t²) plus two sorts of that many keys; no float atomics (a deterministic forward); no host
sync when the sizes are known from the shapes (TopK input [B, L]), one otherwise (CSR input:
how many pairs and tiles). The backward (`support_grad`) follows the same rows: each entry's
gradient sums its row partners' G[i, j] · y, G looked up in a hash table of the k selected pairs
(laid out by a sort, no atomics: `_lookup_table`).

Runs on CUDA tensors, or on CPU under TRITON_INTERPRET=1 (tests, tiny shapes). Imports Triton:
check `usable(t)` first.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

from aosae.machine import triton_interpreting
from aosae.ops.conventions import pad_to_k

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FORCE_ENV = "AOSAE_SPARSE_TRITON"
_INT32_MAX = 2**31 - 1


def usable(t: torch.Tensor) -> bool:
    """Whether the Triton sparse kernels run on tensors like t: float16/bfloat16/float32 on CUDA
    (or on CPU under Triton's interpreter) with Triton installed."""
    if t.dtype not in DTYPES or importlib.util.find_spec("triton") is None:
        return False
    return t.device.type == "cuda" or (t.device.type == "cpu" and triton_interpreting())


def preferred(t: torch.Tensor) -> bool:
    """Whether the sparse path should run these kernels on t: on CUDA whenever they can, and on
    CPU only when AOSAE_SPARSE_TRITON=1 asks for them (with TRITON_INTERPRET=1: dry runs of
    the GPU path, e.g. benchmarks/gpu_suite.py --device cpu). Elsewhere C++ or torch runs."""
    forced = t.device.type == "cpu" and os.environ.get(FORCE_ENV, "0") == "1"
    return (t.device.type == "cuda" or forced) and usable(t)


def _block(gpu: int) -> int:
    # small tiles under the interpreter so that tests cover rows spanning several tiles
    return 16 if triton_interpreting() else gpu


def _key32(n: int, diag: bool) -> bool:
    """Whether every key i·n + j (shifted by −2³¹) fits an int32 below the INT32_MAX sentinel."""
    largest = (n - 1) * n + (n - 1) if diag else (n - 2) * n + (n - 1)
    return largest - 2**31 < 2**31 - 1


def _tri_decode(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(i, j), i <= j, of the q-th tile in column-major upper-triangle order
    (0,0) (0,1) (1,1) (0,2) …: the first T(nt) tiles cover exactly the tiles below nt."""
    j = ((torch.sqrt(8 * q.double() + 1) - 1) / 2).floor().long()
    j = j - (j * (j + 1) // 2 > q).long()  # float rounding, either way
    j = j + ((j + 1) * (j + 2) // 2 <= q).long()
    return q - j * (j + 1) // 2, j


def _work_list(per_row: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, index within the row) of `total` = Σ per_row work items, int32, on device."""
    rows = torch.arange(per_row.numel(), device=per_row.device)
    row_of = torch.repeat_interleave(rows, per_row, output_size=total)
    first = torch.cumsum(per_row, 0) - per_row
    return row_of.to(torch.int32), (torch.arange(total, device=per_row.device) - first[row_of])


def _pair_layout(row_ptr: torch.Tensor, diag: bool, block: int, sizes: tuple[int, int] | None):
    """Per-row pair offsets and the tile work list; sizes = (pairs, tiles) when known."""
    l0 = row_ptr[1:] - row_ptr[:-1]
    pairs = l0 * (l0 + 1) // 2 if diag else l0 * (l0 - 1) // 2
    nt = (l0 + block - 1) // block
    tiles = nt * (nt + 1) // 2
    if sizes is None:  # the one host sync of CSR input
        sizes = tuple(int(v) for v in torch.stack([pairs.sum(), tiles.sum()]).tolist())
    total_pairs, total_tiles = sizes
    tile_row, q = _work_list(tiles, total_tiles)
    ti, tj = _tri_decode(q)
    return torch.cumsum(pairs, 0) - pairs, total_pairs, tile_row, ti.to(torch.int32), tj.to(torch.int32)


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it t's (a tensor on cuda:1, say)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def csr_topk(row_ptr, cols, vals, n: int, k: int, cosine: bool, *, sizes: tuple[int, int] | None = None,
             pad: bool = True):
    """Top-k pairs of the [R, n] matrix given as CSR (row_ptr [R+1] int64, cols [nnz] int64
    distinct within a row, any order; vals [nnz] float16/bfloat16/float32). Zeros in vals are
    allowed and count for nothing. sizes = (pairs, tiles) skips the host sync that counts them
    (see padded_topk). Returns (values [k] fp32, rows [k] int64, cols [k] int64), contract order.

    pad=False (coactive_topk): min(k, P) entries, P = pairs with a non-zero score, one host
    sync to count them; when k >= P they come in (row, col) ascending order, the score sort skipped.
    """
    with _on_device(vals):
        return _csr_topk(row_ptr, cols, vals, n, k, cosine, sizes, pad)


def _csr_topk(row_ptr, cols, vals, n: int, k: int, cosine: bool, sizes, pad: bool = True):
    from aosae.kernels import sparse_pairs as kern  # Triton: imported only when used

    device = vals.device
    block = _block(64)
    key32 = _key32(n, cosine)
    pair_off, total, tile_row, ti, tj = _pair_layout(row_ptr, cosine, block, sizes)
    if total > 2**31 - 1:  # torch.sort (CUB) sorts at most INT_MAX elements
        raise ValueError(
            f"{total} co-active pairs in this batch: more than the sparse path's 2^31 - 1 (and ~{total * 40 >> 30} GiB); "
            f"use a smaller batch, or backend='triton' (dense) for activations this dense"
        )
    if total == 0:
        return _empty(device, k if pad else 0)
    keys = torch.empty(total, dtype=torch.int32 if key32 else torch.int64, device=device)
    prods = torch.empty(total, dtype=torch.float32, device=device)
    kern._emit_kernel[(tile_row.numel(),)](  # 8 warps: a 64 × 64 tile of int64 keys spills at 4
        row_ptr, cols, vals, pair_off, tile_row, ti, tj, n, keys, prods,
        DIAG=cosine, KEY32=key32, BLOCK=block, num_warps=8,
    )
    skeys, perm = torch.sort(keys, stable=True)  # stable: each run's products stay in row order
    del keys
    sprods = prods[perm]
    del prods, perm
    sums = torch.empty(total, dtype=torch.float32, device=device)
    sel = torch.empty(total, dtype=torch.int32, device=device)
    norm_sq = torch.zeros(n if cosine else 1, dtype=torch.float32, device=device)
    rblock = _block(1024)
    grid = (_cdiv(total, rblock),)
    kern._reduce_kernel[grid](skeys, sprods, total, n, sums, sel, norm_sq,
                              COSINE=cosine, KEY32=key32, BLOCK=rblock, CHUNK=8, num_warps=4)
    del sprods
    if cosine:
        kern._cosine_score_kernel[grid](skeys, sums, norm_sq, total, n, sel, KEY32=key32, BLOCK=rblock, num_warps=4)
    if not pad:
        live = sel != _INT32_MAX
        if int(live.sum()) <= k:  # every pair: the slots are in (i, j) order already, no score sort
            top = live.nonzero().flatten()
            flat = skeys[top].long() + (2**31 if key32 else 0)
            return sums[top].contiguous(), flat // n, flat % n
    # 32-bit keys: half the radix passes of a 64-bit (|value|, slot) key; stable keeps (i, j) order
    sel_sorted, order = torch.sort(sel, stable=True)
    take = min(k, total)
    top, live = order[:take], sel_sorted[:take] != _INT32_MAX
    flat = skeys[top].long() + (2**31 if key32 else 0)
    minus_one = torch.full_like(flat, -1)
    values = torch.where(live, sums[top], torch.zeros((), dtype=torch.float32, device=device))
    rows = torch.where(live, flat // n, minus_one)
    cols_out = torch.where(live, flat % n, minus_one)
    if not pad:  # more than k live pairs: the first k slots are all live
        return values, rows, cols_out
    return pad_to_k(values, rows, cols_out, k)


def _padded_csr(indices: torch.Tensor, values: torch.Tensor):
    """indices/values [B, L] read as CSR rows of L entries each, in place (zeros included)."""
    B, L = indices.shape
    row_ptr = torch.arange(B + 1, device=indices.device, dtype=torch.int64) * L
    return row_ptr, indices.reshape(-1).long(), values.reshape(-1)


def padded_topk(indices: torch.Tensor, values: torch.Tensor, n: int, k: int, cosine: bool):
    """csr_topk of a TopK SAE's latents given as indices/values [B, L] (distinct per row): the
    rows are read in place, and every size follows from the shapes, so nothing syncs."""
    B, L = indices.shape
    nt = _cdiv(L, _block(64))
    sizes = (B * (L * (L + 1) // 2 if cosine else L * (L - 1) // 2), B * nt * (nt + 1) // 2)
    return csr_topk(*_padded_csr(indices, values), n, k, cosine, sizes=sizes)


def support_grad(row_ptr, cols, vals, n: int, grad_out, out_values, rows, cols_sel, cosine: bool,
                 *, blocks: int | None = None) -> torch.Tensor:
    """Gradient of the selected scores w.r.t. the CSR values [nnz] (the same CSR as the forward):
      dot:    grad[e] = Σ_{e' in row(e)} G[c_e, c_e'] · x_e'
      cosine: grad[e] = (Σ_{e'} G[c_e, c_e'] · x̂_e' − x̂_e · u_{c_e}) / ‖f_{c_e}‖,
    x̂ = x / ‖f_c‖, u_i = Σ_{p ∋ i} g_p v_p. grad_out/out_values/rows/cols_sel [k] as returned by
    csr_topk (empty slots -1). `blocks` = Σ_t ceil(L0_t / BLOCK) skips its host sync.
    Returns fp32 [nnz]."""
    with _on_device(vals):
        return _support_grad(row_ptr, cols, vals, n, grad_out, out_values, rows, cols_sel, cosine, blocks)


def _support_grad(row_ptr, cols, vals, n, grad_out, out_values, rows, cols_sel, cosine, blocks):
    from aosae.kernels import sparse_pairs as kern

    device = vals.device
    block = _block(32)
    x = vals.float()
    valid = rows >= 0
    g = torch.where(valid, grad_out.float(), torch.zeros((), device=device))
    # G's lookup table: the selected keys (empty slots −1, skipped), load factor ≤ 1/2
    keys = torch.where(valid, rows * n + cols_sel, torch.full_like(rows, -1))
    table_keys, table_g, bits = _lookup_table(keys, g)
    if cosine:
        sq = torch.zeros(n, dtype=torch.float32, device=device).index_add_(0, cols, x * x)
        inv = torch.where(sq > 0, sq.rsqrt(), torch.zeros_like(sq))
        y = x * inv[cols]
    else:
        y = x
    l0 = row_ptr[1:] - row_ptr[:-1]
    per_row = (l0 + block - 1) // block
    if blocks is None:
        blocks = int(per_row.sum())
    work_row, work_blk = _work_list(per_row, blocks)
    grad = torch.zeros_like(x)
    if blocks:
        kern._support_grad_kernel[(blocks,)](
            row_ptr, cols, y, work_row, work_blk.to(torch.int32), n, table_keys, table_g, (1 << bits) - 1, grad,
            SHIFT=64 - bits, BLOCK=block, num_warps=4,
        )
    if cosine:
        gv = g * out_values.float()
        r, c = rows.clamp_min(0), cols_sel.clamp_min(0)
        u = torch.zeros(n, dtype=torch.float32, device=device).index_add_(0, r, gv).index_add_(0, c, gv)
        grad = (grad - y * u[cols]) * inv[cols]
    return grad


def _lookup_table(keys: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Open addressing with linear probing for the K keys (distinct, or −1: skipped) and their g,
    laid out without atomics: sorted by home slot (a stable sort), key e goes to
    e + max_{e' <= e}(home_e' − e'), the slot linear probing gives it when the keys arrive in that
    order. 2^bits ≥ 2K home slots, then K more so that a probe never wraps. Returns
    (table_keys int64, table_g fp32, bits)."""
    from aosae.kernels import sparse_pairs as kern

    K, device = keys.numel(), keys.device
    bits = max(4, (2 * K - 1).bit_length())
    home = torch.empty(K, dtype=torch.int64, device=device)
    if K:
        block = _block(1024)
        kern._table_home_kernel[(_cdiv(K, block),)](keys, K, home, (1 << bits) - 1, SHIFT=64 - bits, BLOCK=block,
                                                    num_warps=4)
    # homes ≤ 2^bits: 32-bit sort keys (half the radix passes) while they fit
    home, order = torch.sort(home.to(torch.int32) if bits < 31 else home, stable=True)
    rank = torch.arange(K, device=device)
    slot = rank + torch.cummax(home.long() - rank, 0).values
    table_keys = torch.full(((1 << bits) + K + 1,), -1, dtype=torch.int64, device=device)
    table_g = torch.zeros((1 << bits) + K + 1, dtype=torch.float32, device=device)
    table_keys[slot] = keys[order]  # the skipped keys (home 2^bits, sorted last) write −1 past every home
    table_g[slot] = g[order]
    return table_keys, table_g, bits


def padded_grad(indices, values, n: int, grad_out, out_values, rows, cols_sel, cosine: bool) -> torch.Tensor:
    """support_grad for indices/values [B, L] (padded_topk's input); returns [B, L] in values' dtype."""
    B, L = indices.shape
    grad = support_grad(*_padded_csr(indices, values), n, grad_out, out_values, rows, cols_sel, cosine,
                        blocks=B * _cdiv(L, _block(32)))
    return grad.view(B, L).to(values.dtype)


def _empty(device, k: int):
    z = torch.zeros(0, dtype=torch.float32, device=device)
    i = torch.zeros(0, dtype=torch.int64, device=device)
    return pad_to_k(z, i, i, k)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
