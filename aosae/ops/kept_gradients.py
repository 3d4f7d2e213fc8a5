"""Memory for a weight's gradient kept between training steps (CPU).

The sparse step's backward builds W_enc's and W_dec's gradients as fresh [n, d] tensors. Above
glibc's 32 MiB mmap ceiling each is mapped afresh every step, and the kernel faults in and zeroes
it page by page: at d_sae 16384, d_in 576 that was 18 400 page faults in every backward, and
each gradient took 12–16 ms to build where 5 ms do into memory already touched
(benchmarks/NOTES.md, thirty-second pass). Here each weight keeps the memory of its last gradient
and its next gradient is written into it when nobody else holds it any more: the trainer's
`zero_grad(set_to_none=True)` drops `.grad`, so from the second step on no gradient page is new.

Safe by construction: the memory is reused only when its storage has no user but this module
(a `.grad` still set, a view of it, or a gradient a caller kept all count), else the gradient
gets fresh memory as before. What is kept dies with its weight; `release()` frees it sooner.
Gradients above KEPT_GRADIENT_BYTES are not kept (the memory would outlive training).
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch

KEPT_GRADIENT_BYTES = 1 << 30  # the largest gradient kept: d_sae 262144 × d_in 1024 in float32

_kept: dict = {}  # id(weight) -> (weakref to the weight, its kept UntypedStorage)


def _use_count(storage: torch.UntypedStorage) -> int:
    return torch._C._storage_Use_Count(storage._cdata)


def gradient_buffer(weight: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """An uninitialised [rows, cols] contiguous tensor in weight's dtype for (a layout of) its
    gradient: the kept memory of its last gradient when no one else uses it, else fresh memory
    (which is kept when none is yet). Fresh memory, never kept, off the CPU, under grad mode (a
    differentiable backward may keep its outputs) or above KEPT_GRADIENT_BYTES."""
    nbytes = rows * cols * weight.element_size()
    if (weight.device.type != "cpu" or torch.is_grad_enabled() or nbytes > KEPT_GRADIENT_BYTES
            or not hasattr(torch._C, "_storage_Use_Count")):
        return weight.new_empty(rows, cols)
    key = id(weight)
    entry = _kept.get(key)
    if entry is not None and entry[0]() is weight:
        storage = entry[1]
        if storage.nbytes() == nbytes and _use_count(storage) == 1:
            return torch.empty(0, dtype=weight.dtype).set_(storage, 0, (rows, cols), (cols, 1))
        if storage.nbytes() == nbytes:  # in use (a .grad not set to None, or kept by a caller)
            return weight.new_empty(rows, cols)
    fresh = weight.new_empty(rows, cols)
    _kept[key] = (weakref.ref(weight, lambda _dead, key=key: _kept.pop(key, None)), fresh.untyped_storage())
    return fresh


def release(weight: Optional[torch.Tensor] = None) -> None:
    """Frees the gradient memory kept for weight (default: for every weight), e.g. after training in
    a long-lived process."""
    if weight is None:
        _kept.clear()
    else:
        _kept.pop(id(weight), None)
