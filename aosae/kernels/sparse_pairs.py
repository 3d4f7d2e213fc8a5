"""Triton kernels of the sparse path on GPU: co-active pairs, their sums, their scores, and the
gradient that follows the non-zeros.

The input is CSR (row_ptr, cols, vals): row t holds the L0_t latents active on token t. Its
co-active pairs (s < s' within the row; s = s' too for cosine, whose diagonal gives the norms)
are numbered row by row, so every pair has a fixed slot and nothing here depends on the order
in which programs run. The host side (aosae/ops/backends/sparse_triton.py) sorts the pair keys
(CUB radix sort through torch.sort), so equal pairs from different rows sit side by side, in
row order; `_reduce_kernel` sums each run in a fixed order. The forward is deterministic: no
float atomics. The backward looks the k selected pairs up in a hash table laid out by a sort of
their home slots (`_table_home_kernel`), the same layout every run.
(The cosine backward's norm sums use torch's index_add_, which is atomic on CUDA.)

Keys: i·n + j as int64, or shifted by −2³¹ into int32 when n² fits (half the sort's bytes).
Pairs that do not count (a zero product) get the largest key and sort last.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _emit_kernel(
    row_ptr, cols_ptr, vals_ptr, pair_off_ptr, tile_row_ptr, tile_i_ptr, tile_j_ptr, n,
    keys_ptr, prods_ptr,
    DIAG: tl.constexpr, KEY32: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program per (row, tile_i <= tile_j) tile of a row's entries: writes the key and the
    product of every pair (s, s') with s < s' (s <= s' with DIAG) to the pair's fixed slot
    pair_off[row] + (its rank in the row's upper triangle, row-major)."""
    q = tl.program_id(0)
    t = tl.load(tile_row_ptr + q)
    ti = tl.load(tile_i_ptr + q)
    tj = tl.load(tile_j_ptr + q)
    start = tl.load(row_ptr + t)
    l0 = tl.load(row_ptr + t + 1) - start
    base = tl.load(pair_off_ptr + t)
    s = ti * BLOCK + tl.arange(0, BLOCK)
    s2 = tj * BLOCK + tl.arange(0, BLOCK)
    in1 = s < l0
    in2 = s2 < l0
    c1 = tl.load(cols_ptr + start + s, mask=in1, other=0)
    c2 = tl.load(cols_ptr + start + s2, mask=in2, other=0)
    v1 = tl.load(vals_ptr + start + s, mask=in1, other=0.0).to(tl.float32)
    v2 = tl.load(vals_ptr + start + s2, mask=in2, other=0.0).to(tl.float32)
    s_col = s.to(tl.int64)[:, None]
    s2_row = s2.to(tl.int64)[None, :]
    if DIAG:
        valid = in1[:, None] & in2[None, :] & (s_col <= s2_row)
        rank = s_col * l0 - s_col * (s_col - 1) // 2 + (s2_row - s_col)
    else:
        valid = in1[:, None] & in2[None, :] & (s_col < s2_row)
        rank = s_col * l0 - s_col * (s_col + 1) // 2 + (s2_row - s_col - 1)
    prod = v1[:, None] * v2[None, :]
    lo = tl.minimum(c1[:, None], c2[None, :]).to(tl.int64)
    hi = tl.maximum(c1[:, None], c2[None, :]).to(tl.int64)
    key = lo * n + hi
    if KEY32:
        key = tl.where(prod != 0.0, key - 2147483648, 2147483647).to(tl.int32)
    else:
        key = tl.where(prod != 0.0, key, 9223372036854775807)
    tl.store(keys_ptr + base + rank, key, mask=valid)
    tl.store(prods_ptr + base + rank, prod, mask=valid)


@triton.jit
def _reduce_kernel(
    skeys_ptr, sprods_ptr, P, n, sums_ptr, sel_ptr, norm_sq_ptr,
    COSINE: tl.constexpr, KEY32: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
):
    """Over the sorted keys: the first slot of each run of equal keys gets the run's sum (in a
    fixed order: row order, CHUNK slots at a time); with COSINE a diagonal run (i, i) writes norm_sq[i] instead. Without COSINE the
    selection key is written here too (see _selection_key); every other slot gets INT32_MAX."""
    pos = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = pos < P
    key = tl.load(skeys_ptr + pos, mask=inside, other=0)
    prev = tl.load(skeys_ptr + pos - 1, mask=inside & (pos > 0), other=0)
    if KEY32:
        live = key != 2147483647
    else:
        live = key != 9223372036854775807
    head = inside & live & ((pos == 0) | (key != prev))
    total = tl.load(sprods_ptr + pos, mask=head, other=0.0)
    nxt = pos + 1
    more = head & (nxt < P)
    more = more & (tl.load(skeys_ptr + nxt, mask=more, other=0) == key)
    # a run holds the rows where its pair fires (a frequent latent's diagonal: thousands), so it
    # is walked CHUNK slots at a time; a run is contiguous, so "equal key" is "inside the run"
    while tl.max(more.to(tl.int32), axis=0) > 0:
        offs = nxt[:, None] + tl.arange(0, CHUNK)[None, :]
        inrun = more[:, None] & (offs < P)
        inrun = inrun & (tl.load(skeys_ptr + offs, mask=inrun, other=0) == key[:, None])
        total += tl.sum(tl.load(sprods_ptr + offs, mask=inrun, other=0.0), axis=1)
        nxt += CHUNK
        more = more & (nxt < P)
        more = more & (tl.load(skeys_ptr + nxt, mask=more, other=0) == key)
    flat = key.to(tl.int64)
    if KEY32:
        flat = flat + 2147483648
    i = flat // n
    j = flat - i * n
    if COSINE:
        diag = head & (i == j)
        tl.store(norm_sq_ptr + i, total, mask=diag)
        tl.store(sums_ptr + pos, tl.where(head & (i != j), total, 0.0), mask=inside)
    else:
        tl.store(sums_ptr + pos, tl.where(head, total, 0.0), mask=inside)
        tl.store(sel_ptr + pos, _selection_key(total, head), mask=inside)


@triton.jit
def _selection_key(value, keep):
    """An int32 that sorts ascending by |value| descending: the bits of |value| reversed (a
    non-negative fp32 orders like its bits). The slots are in (i, j) order, so a stable sort on
    this key leaves ties in the contract's (row, col) order. INT32_MAX where not kept or zero."""
    bits = tl.abs(value).to(tl.int32, bitcast=True)
    return tl.where(keep & (value != 0.0), 2147483647 - bits, 2147483647)


@triton.jit
def _cosine_score_kernel(
    skeys_ptr, sums_ptr, norm_sq_ptr, P, n, sel_ptr,
    KEY32: tl.constexpr, BLOCK: tl.constexpr,
):
    """Cosine: sums[pos] /= ‖f_i‖‖f_j‖ in place, then the selection key."""
    pos = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = pos < P
    total = tl.load(sums_ptr + pos, mask=inside, other=0.0)
    keep = inside & (total != 0.0)
    flat = tl.load(skeys_ptr + pos, mask=keep, other=0).to(tl.int64)
    if KEY32:
        flat = flat + 2147483648
    i = flat // n
    j = flat - i * n
    ni = tl.load(norm_sq_ptr + i, mask=keep, other=1.0)
    nj = tl.load(norm_sq_ptr + j, mask=keep, other=1.0)
    # a norm is 0 only when every square underflowed: cosine 0, as for a zero column. IEEE
    # sqrt and division: the compiled defaults (sqrt.approx.ftz) would flush a subnormal norm to 0
    keep = keep & (ni > 0.0) & (nj > 0.0)
    score = tl.where(keep, tl.div_rn(tl.div_rn(total, tl.sqrt_rn(ni)), tl.sqrt_rn(nj)), 0.0)
    tl.store(sums_ptr + pos, score, mask=inside)
    tl.store(sel_ptr + pos, _selection_key(score, keep), mask=inside)


@triton.jit
def _slot(key, mask_bits, SHIFT: tl.constexpr):
    """Home slot of a key in a table of mask_bits + 1 = 2^(64 − SHIFT) slots: the high bits of a
    multiplicative hash (the PCG multiplier, odd and below 2^63 so it stays a signed int64)."""
    return ((key * 6364136223846793005) >> SHIFT) & mask_bits


@triton.jit
def _table_home_kernel(keys_ptr, K, home_ptr, mask_bits, SHIFT: tl.constexpr, BLOCK: tl.constexpr):
    """home[e] = the home slot of the selected pair key e (keys < 0, empty selection slots, get
    mask_bits + 1: past every home, so they sort last). The host sorts the keys by home slot and
    places key e at e + max_{e' <= e}(home_e' − e'): linear probing's layout, built by a sort and a
    running max instead of atomic compare-and-swaps (10.7 M CAS inserts took 2.6 ms on an H200),
    the same layout whatever order programs run in."""
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    key = tl.load(keys_ptr + e, mask=e < K, other=-1)
    tl.store(home_ptr + e, tl.where(key >= 0, _slot(key, mask_bits, SHIFT), mask_bits + 1), mask=e < K)


@triton.jit
def _support_grad_kernel(
    row_ptr, cols_ptr, y_ptr, work_row_ptr, work_blk_ptr, n,
    table_keys_ptr, table_g_ptr, mask_bits, grad_ptr,
    SHIFT: tl.constexpr, BLOCK: tl.constexpr,
):
    """grad[e] = Σ_{e' in e's row, e' != e} G[col_e, col_e'] · y[e'] for the entries e of one
    (row, block of BLOCK entries); G[i, j] = G[j, i] is the selected pair's upstream gradient
    (0 when (i, j) is not selected), looked up in the table the host builds from
    _table_home_kernel (≈ 1.5 probes at its load factor ≤ 1/2; the table runs past its last home
    slot by as many slots as keys, so a probe never wraps). Each entry is written by one program,
    summed in a fixed order."""
    q = tl.program_id(0)
    t = tl.load(work_row_ptr + q)
    blk = tl.load(work_blk_ptr + q)
    start = tl.load(row_ptr + t)
    l0 = tl.load(row_ptr + t + 1) - start
    s = blk * BLOCK + tl.arange(0, BLOCK)
    in1 = s < l0
    c1 = tl.load(cols_ptr + start + s, mask=in1, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for b2 in range(0, l0, BLOCK):
        s2 = b2 + tl.arange(0, BLOCK)
        in2 = s2 < l0
        c2 = tl.load(cols_ptr + start + s2, mask=in2, other=0).to(tl.int64)
        y2 = tl.load(y_ptr + start + s2, mask=in2, other=0.0)
        probing = in1[:, None] & in2[None, :] & (c1[:, None] != c2[None, :])
        query = tl.minimum(c1[:, None], c2[None, :]) * n + tl.maximum(c1[:, None], c2[None, :])
        slot = _slot(query, mask_bits, SHIFT)
        g = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        while tl.max(tl.max(probing.to(tl.int32), axis=1), axis=0) > 0:
            at = tl.load(table_keys_ptr + slot, mask=probing, other=-1)
            hit = probing & (at == query)
            g = tl.where(hit, tl.load(table_g_ptr + slot, mask=hit, other=0.0), g)
            probing = probing & (at != query) & (at != -1)  # an empty slot ends the probe: absent
            slot = slot + 1
        acc += tl.sum(g * y2[None, :], axis=1)
    tl.store(grad_ptr + start + s, acc, mask=in1)
