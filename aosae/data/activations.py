"""LM activations at one layer: collection batch by batch, into a disk store or straight to the trainer.

Collection runs the LM only up to the hooked layer and drops BOS and pad positions. Text windows
come from `token_windows` (window i goes to DDP rank i % world_size), so the rows of a rank are a
pure function of (model, layer, dataset, context, rank, world size): a collection can restart at
any window, and a streaming run can re-read any stretch of its token stream by re-tokenising up
to it (cheap) and running the LM only from there.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Optional

import torch

from aosae.data.language_models import residual_at
from aosae.data.store import StoreWriter
from aosae.data.text import shortfall, token_windows


def keep_mask(ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """[B, T] bool: the positions whose activations are kept (not BOS, not pad)."""
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[..., 0] = False  # the BOS position: an outlier with a huge norm, not text
    pad, bos = tokenizer.pad_token_id, tokenizer.bos_token_id
    if pad is not None and pad != bos:
        keep &= ids != pad
    return keep


def activation_batches(model, tokenizer, windows: Iterable[torch.Tensor], layer: int, *, lm_batch: int = 16,
                       device: str | torch.device = "cpu") -> Iterator[tuple[torch.Tensor, int]]:
    """Run the LM over `windows` ([context] token ids each), lm_batch at a time.

    Yields (acts [n, d_model] in the LM's dtype on CPU, number of windows they came from)."""
    batch: list[torch.Tensor] = []

    def run():
        ids = torch.stack(batch).to(device)
        hidden = residual_at(model, ids, torch.ones_like(ids), layer)  # [B, T, d]
        return hidden[keep_mask(ids, tokenizer)].cpu(), len(batch)

    for window in windows:
        batch.append(window)
        if len(batch) == lm_batch:
            yield run()
            batch.clear()
    if batch:
        yield run()


def _progress(total: int, initial: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="tok", dynamic_ncols=True)


def collect_to_store(writer: StoreWriter, model, tokenizer, texts: Iterable[str], layer: int, n_tokens: int, *,
                     context: int = 128, lm_batch: int = 16, device: str | torch.device = "cpu", rank: int = 0,
                     world_size: int = 1, progress: bool = False):
    """Fill `writer` up to n_tokens rows and finish it; resumes after the shards it already has.

    Returns the complete ActivationStore. ValueError if the text runs out first."""
    windows = token_windows(texts, tokenizer, context, rank=rank, world_size=world_size)
    for _ in range(writer.windows_done):  # tokenising only: the LM restarts where the kill stopped it
        next(windows, None)
    have = writer.rows_done
    bar = _progress(n_tokens, have, f"activations L{layer}", progress)
    try:
        for acts, used in activation_batches(model, tokenizer, windows, layer, lm_batch=lm_batch, device=device):
            acts = acts[: n_tokens - have]
            writer.append(acts, used)
            have += acts.shape[0]
            if bar is not None:
                bar.update(acts.shape[0])
            if have >= n_tokens:
                break
    except BaseException:
        writer.close()
        raise
    finally:
        if bar is not None:
            bar.close()
    if have < n_tokens:
        writer.close()
        raise ValueError(shortfall(texts, have, n_tokens))
    return writer.finish()


def collect_activations(model, tokenizer, texts: Iterable[str], layer: int, n_tokens: int, *, context: int = 128,
                        lm_batch: int = 16, device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1,
                        progress: bool = False) -> torch.Tensor:
    """n_tokens activations [n_tokens, d_model] float32 in RAM (small budgets; training uses a store)."""
    out: Optional[torch.Tensor] = None
    have = 0
    windows = token_windows(texts, tokenizer, context, rank=rank, world_size=world_size)
    for acts, _ in activation_batches(model, tokenizer, windows, layer, lm_batch=lm_batch, device=device):
        if out is None:
            out = torch.empty(n_tokens, acts.shape[1])
        acts = acts[: n_tokens - have]
        out[have : have + acts.shape[0]] = acts
        have += acts.shape[0]
        if have >= n_tokens:
            return out
    raise ValueError(shortfall(texts, have, n_tokens))


class StreamSource:
    """Rows [start, stop) of a rank's activation stream, computed by the LM on demand (no store).

    Reading on from where the last read stopped costs only the LM over the new rows. Any other
    start (a resume, a new epoch) re-tokenises the text from the beginning, counting kept tokens
    per window without the LM, and runs the LM from the window holding `start`."""

    sequential = True  # the mixing buffer must read it in order: chunks are not shuffled

    def __init__(self, model, tokenizer, texts_factory, layer: int, n_tokens: int, *, offset: int = 0,
                 context: int = 128, lm_batch: int = 16, device: str | torch.device = "cpu", rank: int = 0,
                 world_size: int = 1, d: Optional[int] = None):
        self.model, self.tokenizer, self.texts_factory, self.layer = model, tokenizer, texts_factory, layer
        self.offset, self.n_tokens = offset, n_tokens
        self.context, self.lm_batch, self.device, self.rank, self.world = context, lm_batch, device, rank, world_size
        self.d = d if d is not None else model.config.hidden_size
        self.dtype = torch.float32
        self._stream: Optional[Iterator[tuple[torch.Tensor, int]]] = None
        self._pending = torch.empty(0, self.d)
        self._cursor = -1  # stream position of _pending's first row

    def _restart(self, position: int) -> None:
        windows = token_windows(self.texts_factory(), self.tokenizer, self.context, rank=self.rank,
                                world_size=self.world)
        # restart at an lm_batch boundary: the LM sees the same batches as an uninterrupted pass, and
        # a batch's numbers depend on its composition (BLAS blocking), so the rows are bitwise the same
        cursor, batch, batch_start = 0, [], 0
        for window in windows:
            kept = int(keep_mask(window[None], self.tokenizer).sum())
            if not batch:
                batch_start = cursor
            batch.append(window)
            if cursor + kept > position:
                break
            cursor += kept
            if len(batch) == self.lm_batch:
                batch = []
        else:
            raise ValueError(f"the dataset ran out after {cursor} tokens; ask for fewer tokens (--tokens)")

        def chained():
            yield from batch
            yield from windows

        self._stream = activation_batches(self.model, self.tokenizer, chained(), self.layer,
                                          lm_batch=self.lm_batch, device=self.device)
        self._pending, self._cursor = torch.empty(0, self.d), batch_start

    def read(self, start: int, stop: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not 0 <= start <= stop <= self.n_tokens:
            raise IndexError(f"rows [{start}, {stop}) outside the stream's {self.n_tokens}")
        a, b = start + self.offset, stop + self.offset
        if self._stream is None or not self._cursor <= a <= self._cursor + self._pending.shape[0]:
            self._restart(a)
        parts, have = [self._pending], self._cursor + self._pending.shape[0]  # have: stream position reached
        while have < b:
            acts, _ = next(self._stream, (None, 0))
            if acts is None:
                raise ValueError(f"the dataset ran out after {have} tokens; ask for fewer tokens (--tokens)")
            parts.append(acts.float())
            have += acts.shape[0]
        rows = torch.cat(parts)[a - self._cursor :]  # at most one read's worth plus one LM batch
        self._pending, self._cursor = rows[b - a :].clone(), b
        if out is None:
            return rows[: b - a].clone()
        out.copy_(rows[: b - a])
        return out
