"""The positions of a batch's top B·k pre-activations (BatchTopK's selection) without a top-k over
all B·n of them: a strided sample bounds the B·k-th value from below, and the top-k runs over the
entries above that bound only (aosae.ops.latent_selection.select)."""
from __future__ import annotations

import math
from typing import Optional

import torch

SAMPLE = 1 << 18  # entries of the strided sample that bounds the batch top-k from below
SCAN_CHUNK = 1 << 22  # entries compared with the bound at a time on CPU (a 4 MiB mask)


def sample_stride(total: int) -> int:
    """About total // SAMPLE, sharing no factor with total (= B·n), so that the strided sample
    spreads evenly over the latents: a stride dividing n took the same n / stride latents of
    every row, and when those fired more than the rest the bound came out too high and the full
    top-k ran (at d_sae 16384, stride 128: a BatchTopK step of 0.73 s instead of 0.31 s, steps
    22–34 of the penalty's share benchmark; benchmarks/NOTES.md, fourteenth pass)."""
    stride = max(1, total // SAMPLE)
    while math.gcd(stride, total) != 1:
        stride += 1
    return stride


def batch_top(flat: torch.Tensor, count: int) -> torch.Tensor:
    """Positions of the `count` largest entries of flat (any order), exactly.

    A top-k over all B·n entries with k = B·k_row costs ≈ 4× the encoder's top-k per row
    (measured in benchmarks/NOTES.md); instead a strided sample (no RNG: a resume stays exact) gives
    a value `low` that ≈ 1.25·count entries exceed, and the top-k runs over those candidates only.
    Exact whenever at least `count` entries exceed `low` (every other entry is ≤ low, below all
    of the chosen); otherwise the full top-k runs."""
    total = flat.numel()
    if count >= total:
        return torch.arange(total, device=flat.device)
    sample = flat[:: sample_stride(total)]
    expected = count / total * sample.numel()
    rank = min(sample.numel(), int(1.25 * expected + 4 * expected ** 0.5 + 8))
    low = sample.topk(rank, sorted=False).values.min()
    candidates = entries_above(flat, low)
    if candidates.numel() < count:
        return _full_top(flat, count)
    return candidates[flat[candidates].topk(count, sorted=False).indices]


def entries_above(flat: torch.Tensor, low, limit: Optional[int] = None) -> Optional[torch.Tensor]:
    """Positions of flat's entries > low, ascending; None as soon as more than `limit` are (counted
    before any position is listed). On CPU by chunks of SCAN_CHUNK entries: one [B·n] bool mask
    (32 MiB at d_sae 16384, B 2048) is above glibc's mmap ceiling, so mapped and faulted in afresh
    every call; a chunk's is reused."""
    chunk = SCAN_CHUNK if flat.device.type == "cpu" else max(flat.numel(), 1)
    parts, count = [], 0
    for start in range(0, flat.numel(), chunk):
        above = flat[start:start + chunk] > low
        if limit is not None:
            count += int(torch.count_nonzero(above))
            if count > limit:
                return None
        at = above.nonzero().squeeze(1)
        parts.append(at + start if start else at)
    if len(parts) == 1:
        return parts[0]
    return torch.cat(parts) if parts else flat.new_zeros(0, dtype=torch.long)


def _full_top(flat: torch.Tensor, count: int) -> torch.Tensor:
    """The fallback: a top-k over every entry (≈ 4× the sampled path's time)."""
    return flat.topk(count, sorted=False).indices
