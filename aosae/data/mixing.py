"""A bounded shuffling buffer over a row source, whose position is a pure function of the step.

Epoch e reads the source's N rows in chunk order π_e (chunks of buffer_tokens/32 contiguous rows,
permuted with a seed of (seed, e); a sequential source such as the LM stream keeps its order) and
cuts that sequence into groups of buffer_tokens rows. Group g is loaded into the buffer, shuffled
with a seed of (seed, e, g), and gives ⌊rows/B⌋ batches. So batch `step` depends on the step alone:
a resumed run recomputes (e, g, j) and sees exactly the batches of an uninterrupted one. Each batch
mixes rows from ~32 places spread over the whole source (SAELens's mixing buffer does the same with
a refill-half policy, whose state is not a function of the step).

Memory: two float32 buffers of buffer_tokens × d (the group in use and the next one, read and
converted by a background thread while the SAE trains, so a step only gathers its rows, as from
an in-RAM tensor). When N ≤ buffer_tokens there is one group: the whole source, shuffled per
epoch (for a float32 tensor, the former in-RAM behaviour bit for bit, without a copy).
"""
from __future__ import annotations

import threading
from typing import Callable, Optional, Protocol

import torch

CHUNKS_PER_BUFFER = 32


class RowSource(Protocol):
    n_tokens: int
    d: int
    dtype: torch.dtype

    def read(self, start: int, stop: int, out: Optional[torch.Tensor] = None) -> torch.Tensor: ...


class TensorSource:
    """Rows of an in-memory tensor [N, d] (given activations, e.g. shared by ablation arms)."""

    sequential = False

    def __init__(self, acts: torch.Tensor):
        if acts.dim() != 2:
            raise ValueError(f"acts must be [n_tokens, d], got {tuple(acts.shape)}")
        self.acts, self.n_tokens, self.d, self.dtype = acts, acts.shape[0], acts.shape[1], acts.dtype

    def read(self, start: int, stop: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        if out is None:
            return self.acts[start:stop]  # a view: no copy of data already in RAM
        return out.copy_(self.acts[start:stop])


class RowRange:
    """Rows [start, stop) of another source, renumbered from 0."""

    def __init__(self, source, start: int, stop: int):
        self.source, self.start, self.n_tokens = source, start, stop - start
        self.d, self.dtype = source.d, source.dtype
        self.sequential = getattr(source, "sequential", False)

    def read(self, start: int, stop: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.source.read(self.start + start, self.start + stop, out)


class _Prefetch:
    """fn(key) on a daemon thread: an interrupted run exits without waiting for a group (an LM pass)."""

    def __init__(self, fn: Callable, key: tuple[int, int]):
        self.key, self._value, self._error = key, None, None

        def run():
            try:
                self._value = fn(key)
            except BaseException as err:  # handed to the consumer in result()
                self._error = err

        self._thread = threading.Thread(target=run, name="mixing-prefetch", daemon=True)
        self._thread.start()

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


class MixingBuffer:
    """batch(step) -> [batch_size, d] float32; position(step) -> (epoch, group, index in group)."""

    def __init__(self, source: RowSource, batch_size: int, buffer_tokens: int, seed: int = 0, prefetch: bool = True):
        n = source.n_tokens
        if batch_size > n:
            raise ValueError(
                f"batch size {batch_size} is larger than the activation buffer ({n} tokens); "
                "lower --batch-size or raise --tokens"
            )
        if buffer_tokens < batch_size:
            raise ValueError(f"--buffer-tokens ({buffer_tokens}) must be at least --batch-size ({batch_size})")
        self.source, self.batch_size, self.seed = source, batch_size, seed
        self.group_rows = min(buffer_tokens, n)
        self.n_groups = -(-n // self.group_rows)
        last_rows = n - (self.n_groups - 1) * self.group_rows
        self.steps_per_group = self.group_rows // batch_size
        self.last_group_steps = last_rows // batch_size
        self.steps_per_epoch = (self.n_groups - 1) * self.steps_per_group + self.last_group_steps
        self.chunk = max(1, self.group_rows // CHUNKS_PER_BUFFER)
        self.shuffle_chunks = self.n_groups > 1 and not getattr(source, "sequential", False)
        self._current: Optional[tuple[tuple[int, int], torch.Tensor, torch.Tensor]] = None
        self.prefetch = prefetch and self.n_groups > 1
        self._next: Optional[_Prefetch] = None

    def position(self, step: int) -> tuple[int, int, int]:
        """(epoch, group, index of the batch within the group) of batch `step`."""
        epoch, r = divmod(step, self.steps_per_epoch)
        group = min(r // self.steps_per_group, self.n_groups - 1)
        return epoch, group, r - group * self.steps_per_group

    def _following(self, key: tuple[int, int]) -> tuple[int, int]:
        epoch, group = key
        last_useful = self.n_groups - 1 if self.last_group_steps > 0 else self.n_groups - 2
        return (epoch, group + 1) if group < last_useful else (epoch + 1, 0)

    def pieces(self, epoch: int, group: int) -> list[tuple[int, int]]:
        """Source row ranges [a, b) that make up group `group` of epoch `epoch`, in order."""
        n, lo = self.source.n_tokens, group * self.group_rows
        hi = min(n, lo + self.group_rows)
        if not self.shuffle_chunks:
            return [(lo, hi)]
        n_chunks = -(-n // self.chunk)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 500_000_003)
        out, pos = [], 0
        for c in torch.randperm(n_chunks, generator=gen).tolist():
            a, b = c * self.chunk, min(n, (c + 1) * self.chunk)
            if pos + (b - a) > lo and pos < hi:
                skip = max(0, lo - pos)
                out.append((a + skip, a + min(b - a, hi - pos)))
            pos += b - a
            if pos >= hi:
                break
        return out

    def _load(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Group `key` as float32 rows (converted here, in the loader thread, not per batch) and its shuffle."""
        epoch, group = key
        parts = self.pieces(epoch, group)
        if len(parts) == 1 and self.source.dtype == torch.float32:
            buf = self.source.read(*parts[0])  # a tensor source gives a view: no copy
        else:
            buf = torch.empty(sum(b - a for a, b in parts), self.source.d, dtype=torch.float32)
            pos = 0
            for a, b in parts:
                for lo in range(a, b, self.chunk):  # staging in the source dtype: one chunk at a time
                    hi = min(b, lo + self.chunk)
                    if self.source.dtype == torch.float32:
                        self.source.read(lo, hi, out=buf[pos : pos + hi - lo])
                    else:
                        buf[pos : pos + hi - lo] = self.source.read(lo, hi)
                    pos += hi - lo
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + group * 1_000_000_007)
        return buf, torch.randperm(buf.shape[0], generator=gen)

    def first_rows(self, n: int) -> torch.Tensor:
        """Up to n float32 rows of the first group: a sample spread like the batches (scale, b_dec)."""
        return self._group((0, 0), prefetch=False)[0][:n]

    def _group(self, key: tuple[int, int], prefetch: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        if self._current is None or self._current[0] != key:
            if self._next is not None and self._next.key == key:
                buf, perm = self._next.result()
            else:
                if self._next is not None:
                    self._next.result()  # never two readers on one source at once
                buf, perm = self._load(key)
            self._current, self._next = (key, buf, perm), None
        if prefetch and self.prefetch and self._next is None:
            self._next = _Prefetch(self._load, self._following(key))
        return self._current[1], self._current[2]

    def batch(self, step: int) -> torch.Tensor:
        epoch, group, index = self.position(step)
        buf, perm = self._group((epoch, group))
        return buf[perm[index * self.batch_size : (index + 1) * self.batch_size]]

    def close(self) -> None:
        """Drop the buffers; an in-flight prefetch finishes on its daemon thread or dies with the process."""
        self._current = self._next = None
