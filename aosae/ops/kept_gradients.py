"""Memory for a weight's gradient kept between training steps (CPU).

The sparse step's backward builds W_enc's and W_dec's gradients as fresh [n, d] tensors. Above
glibc's 32 MiB mmap ceiling each is mapped afresh every step, and the kernel faults in and zeroes
it page by page: at d_sae 16384, d_in 576 that was 18 434 page faults in every backward, which
then took 58 ms where it takes 28 (benchmarks/NOTES.md, thirty-second pass). Here each weight
keeps the memory of its last gradient, and its next gradient is written into it once nobody else
holds it: the trainer's `zero_grad(set_to_none=True)` drops `.grad`, so from the second step on no
gradient page is new.

Reused only when this module is the memory's one holder: no tensor on it (`.grad` still set, a
view of it, a gradient `torch.autograd.grad` returned) and no other reference to its storage
object (`.grad.untyped_storage()` returns that same object); else the gradient gets fresh memory as
before. A raw pointer (`data_ptr()`, a shared-memory handle) is not seen: copy a gradient you keep
that way. What is kept dies with its weight; `release()` frees it sooner.
Gradients above KEPT_GRADIENT_BYTES are not kept.
"""
from __future__ import annotations

import sys
import threading
import weakref
from typing import Optional

import torch

KEPT_GRADIENT_BYTES = 1 << 30  # the largest gradient kept: d_sae 262144 × d_in 1024 in float32

_kept: dict = {}  # id(weight) -> (weakref to the weight, its kept UntypedStorage)
_lock = threading.Lock()  # (two threads' backwards on one weight must not both take its memory)
# references to a kept storage object that are this module's own when _only_ours reads them: the
# dict's entry, gradient_buffer's local, _only_ours' argument and getrefcount's
_OWN_REFERENCES = 4


def _only_ours(storage: torch.UntypedStorage) -> bool:
    return torch._C._storage_Use_Count(storage._cdata) == 1 and sys.getrefcount(storage) <= _OWN_REFERENCES


def gradient_buffer(weight: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """An uninitialised [rows, cols] contiguous tensor in weight's dtype for (a layout of) its
    gradient: the kept memory of its last gradient when nobody else holds it, else fresh memory
    (kept when none is yet). Fresh and never kept: off the CPU, under grad mode (a differentiable
    backward may keep its outputs) or above KEPT_GRADIENT_BYTES."""
    nbytes = rows * cols * weight.element_size()
    if (weight.device.type != "cpu" or torch.is_grad_enabled() or nbytes > KEPT_GRADIENT_BYTES
            or not hasattr(torch._C, "_storage_Use_Count")):
        return weight.new_empty(rows, cols)
    key = id(weight)
    with _lock:
        entry = _kept.get(key)
        if entry is not None and entry[0]() is weight and entry[1].nbytes() == nbytes:
            storage = entry[1]
            if _only_ours(storage):
                return torch.empty(0, dtype=weight.dtype).set_(storage, 0, (rows, cols), (cols, 1))
            return weight.new_empty(rows, cols)  # held elsewhere (a .grad not set to None, a caller's)
        fresh = weight.new_empty(rows, cols)
        _kept[key] = (weakref.ref(weight, lambda _dead, key=key: _kept.pop(key, None)), fresh.untyped_storage())
        return fresh


def release(weight: Optional[torch.Tensor] = None) -> None:
    """Frees the gradient memory kept for weight (default: for every weight), e.g. after training in
    a long-lived process (a `.grad` still set keeps it alive)."""
    with _lock:
        if weight is None:
            _kept.clear()
        else:
            _kept.pop(id(weight), None)
