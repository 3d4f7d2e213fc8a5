"""LM activations of labelled texts (probing, SCR, TPP), per token, cached on disk like the training store.

Each text is tokenised as aosae's training windows are (BOS, then the text's tokens, truncated
to `context` tokens in all), the LM runs up to the hooked block, and the positions SAEBench
drops are dropped: BOS, EOS and PAD tokens (and padding). What is left is kept per token, the
texts one after another: rows [n_tokens, d] plus offsets [n_texts + 1] (text i owns rows
offsets[i]:offsets[i+1]). Mean-pooling over a text's kept tokens is then SAEBench's
"mask BOS/PAD/EOS, average the rest"; an SAE is applied per token before pooling.

The rows live in an activation store (aosae.data.store: raw shards, meta.json written last, a
lock while collecting, resumable) under $AOSAE_CACHE/probing/<key>, the key a hash of the model,
layer, context, storage dtype and the texts: every SAE evaluated on the same model and layer
(every arm of an ablation) reuses one LM pass.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from aosae.data.language_models import cache_root, residual_at
from aosae.data.store import STORE_DTYPES, ActivationStore, StoreIncomplete, StoreWriter, store_key, store_lock


@dataclass
class TextActivations:
    """Per-token activations of n texts: rows [n_tokens, d], offsets [n_texts + 1] int64."""
    rows: torch.Tensor
    offsets: torch.Tensor

    def __post_init__(self):
        if self.offsets.dim() != 1 or self.offsets.numel() < 1 or int(self.offsets[0]) != 0:
            raise ValueError("offsets must be a 1-D tensor starting at 0")
        if int(self.offsets[-1]) != self.rows.shape[0]:
            raise ValueError(f"offsets end at {int(self.offsets[-1])} but there are {self.rows.shape[0]} rows")
        if bool((self.offsets[1:] <= self.offsets[:-1]).any()):
            raise ValueError("every text needs at least one kept token (offsets must increase strictly)")

    @property
    def n_texts(self) -> int:
        return self.offsets.numel() - 1

    def text_ids(self) -> torch.Tensor:
        """[n_tokens] int64: the text each row belongs to."""
        return torch.repeat_interleave(torch.arange(self.n_texts), self.offsets.diff())

    def pooled(self) -> torch.Tensor:
        """[n_texts, d] float32 (float64 for float64 rows): each text's mean activation over its kept tokens."""
        return segment_mean(self.rows if self.rows.dtype == torch.float64 else self.rows.float(), self.offsets)

    @torch.no_grad()
    def sae_pooled(self, sae, chunk_tokens: int = 8192) -> torch.Tensor:
        """[n_texts, d_sae] float32 (float64 for a float64 SAE): the SAE's latents, per token, then
        averaged per text."""
        device, dtype = sae.W_dec.device, sae.W_dec.dtype
        dtype = dtype if dtype == torch.float64 else torch.float32  # bf16/fp16 SAEs: pool in float32
        ids = self.text_ids()
        out = None
        for s in range(0, self.rows.shape[0], chunk_tokens):
            f = sae.encode(self.rows[s : s + chunk_tokens].to(device, sae.W_dec.dtype)).to(dtype).cpu()
            if out is None:
                out = torch.zeros(self.n_texts, f.shape[1], dtype=dtype)
            out.index_add_(0, ids[s : s + chunk_tokens], f)
        return out / self.offsets.diff().unsqueeze(1).to(dtype)


def segment_mean(rows: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Mean of rows[offsets[i]:offsets[i+1]] for each i: [n_texts, d]."""
    counts = offsets.diff()
    ids = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    out = torch.zeros(counts.numel(), rows.shape[1], dtype=rows.dtype)
    out.index_add_(0, ids, rows)
    return out / counts.unsqueeze(1).to(rows.dtype)


def tokenize_texts(texts: Sequence[str], tokenizer, context: int) -> list[list[int]]:
    """BOS + the text's tokens, truncated to `context` tokens (aosae's training windows start with BOS)."""
    if context < 2:
        raise ValueError(f"context must be >= 2 (BOS + at least one token), got {context}")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to start each text")
    out = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        out.append([bos] + list(ids)[: context - 1])
    return out


def special_ids(tokenizer) -> set[int]:
    """SAEBench's dropped positions: BOS, EOS and PAD token ids."""
    return {i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None}


def kept_counts(token_lists: list[list[int]], tokenizer) -> list[int]:
    drop = special_ids(tokenizer)
    return [sum(t not in drop for t in ids) for ids in token_lists]


@torch.no_grad()
def collect(model, tokenizer, texts: Sequence[str], layer: int, context: int = 128, lm_batch: int = 16,
            device: str | torch.device = "cpu", writer: Optional[StoreWriter] = None,
            log: Optional[Callable[[str], None]] = None) -> Optional[TextActivations]:
    """Run the LM over `texts`; into `writer` when given (returns None), else in RAM (float32)."""
    token_lists = tokenize_texts(texts, tokenizer, context)
    counts = kept_counts(token_lists, tokenizer)
    empty = [i for i, c in enumerate(counts) if c == 0]
    if empty:
        raise ValueError(f"{len(empty)} texts have no tokens besides BOS/EOS/PAD (the first: {texts[empty[0]]!r}); "
                         "drop empty texts from the task set")
    drop = torch.tensor(sorted(special_ids(tokenizer)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else token_lists[0][0]
    start = writer.windows_done if writer is not None else 0
    parts = []
    group = lm_batch * 32
    for g in range(start, len(token_lists), group):
        # within a group of texts, batch them by length (less padding), then put the rows back in text order
        members = list(range(g, min(g + group, len(token_lists))))
        members.sort(key=lambda i: len(token_lists[i]))
        rows_of = {}
        for s in range(0, len(members), lm_batch):
            batch_ids = members[s : s + lm_batch]
            width = max(len(token_lists[i]) for i in batch_ids)
            ids = torch.full((len(batch_ids), width), pad, dtype=torch.long)
            mask = torch.zeros(len(batch_ids), width, dtype=torch.long)
            for r, i in enumerate(batch_ids):  # right padding: causal attention keeps real positions unchanged
                ids[r, : len(token_lists[i])] = torch.tensor(token_lists[i])
                mask[r, : len(token_lists[i])] = 1
            hidden = residual_at(model, ids.to(device), mask.to(device), layer).cpu()
            keep = mask.bool() & ~torch.isin(ids, drop)
            for r, i in enumerate(batch_ids):
                rows_of[i] = hidden[r][keep[r]]
        acts = torch.cat([rows_of[i] for i in sorted(rows_of)])
        if writer is not None:
            writer.append(acts, len(rows_of))
        else:
            parts.append(acts.float())
        if log is not None:
            log(f"  probing activations: {g + len(rows_of)}/{len(token_lists)} texts")
    if writer is not None:
        return None
    offsets = torch.tensor([0] + counts).cumsum(0)
    return TextActivations(torch.cat(parts), offsets)


def cached_activations(model, tokenizer, texts: Sequence[str], layer: int, *, model_name: str, texts_digest: str,
                       context: int = 128, dtype: str = "bfloat16", lm_batch: int = 16,
                       device: str | torch.device = "cpu", cache_dir: Optional[str | Path] = None,
                       log: Optional[Callable[[str], None]] = None) -> tuple[TextActivations, Path]:
    """The activations of `texts`, from the cache or collected into it (rows float32 in RAM).

    Args:
        model_name: what identifies the LM's weights in the cache key (a hub id or a path).
        texts_digest: a hash of the texts (TaskSet.digest()).
        dtype: storage dtype of the cache (bfloat16, float16, float32; as the training store).
        cache_dir: default $AOSAE_CACHE/probing.
    Returns (activations, the store directory)."""
    if dtype not in STORE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(STORE_DTYPES)}, got {dtype!r}")
    token_lists = tokenize_texts(texts, tokenizer, context)
    counts = kept_counts(token_lists, tokenizer)
    d = int(model.config.hidden_size)
    meta = {"kind": "probing-texts", "model": str(model_name), "layer": int(layer), "context": int(context),
            "texts": texts_digest, "n_texts": len(texts), "lm_dtype": str(next(model.parameters()).dtype)}
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "probing"
    directory = root / store_key(**meta, dtype=dtype)
    with store_lock(directory):
        try:
            store = ActivationStore.open(directory)
        except StoreIncomplete:
            store = None
        except FileNotFoundError:
            store = None
        if store is None:
            if log is not None:
                log(f"probing activations: running the LM over {len(texts)} texts ({sum(counts)} tokens) into {directory}")
            writer = StoreWriter(directory, d, dtype, meta)
            try:
                collect(model, tokenizer, texts, layer, context, lm_batch, device, writer=writer, log=log)
            except BaseException:
                writer.close()
                raise
            store = writer.finish()
            (directory / "texts.json").write_text(json.dumps({"kept_tokens": counts}))
    if store.n_tokens != sum(counts):
        raise ValueError(f"the probing cache {directory} holds {store.n_tokens} tokens, the texts have {sum(counts)} "
                         "(a tokenizer change?): delete the directory to rebuild it")
    rows = store.read(0, store.n_tokens).float()
    store.close()
    return TextActivations(rows, torch.tensor([0] + counts).cumsum(0)), directory
