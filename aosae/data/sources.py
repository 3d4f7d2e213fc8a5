"""Where a training run's activations come from: a disk store (built on first use) or the LM stream.

Under DDP each rank owns one part: windows rank, rank + world, ... of the token stream and
⌊tokens / world⌋ rows of them, in its own store (or stream); no rank reads another's part.

Held-out rows (never trained on, used by the run's final evaluation):
- store: its last n_eval rows, so first_token = rows − n_eval in this rank's token stream;
- stream: its first n_eval rows (first_token = 0), read before training starts.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from aosae.data.activations import StreamSource, collect_to_store
from aosae.data.language_models import DEFAULT_MODEL, cache_root, check_layer, load_model
from aosae.data.mixing import RowRange
from aosae.data.store import ActivationStore, StoreIncomplete, StoreWriter, check_disk_space, store_key, store_lock
from aosae.data.text import DEFAULT_DATASET, iter_texts


@dataclass
class ActivationSpec:
    """What to collect: one rank's part of `tokens` activations of `model` at `layer` over `dataset`."""

    model: Optional[str]
    layer: int
    dataset: Optional[str]
    tokens: int
    context: int
    lm_dtype: str = "float32"
    store_dtype: str = "bfloat16"
    lm_batch: int = 16
    cache_dir: Optional[str] = None
    rank: int = 0
    world: int = 1

    @classmethod
    def from_config(cls, cfg, rank: int = 0, world: int = 1) -> "ActivationSpec":
        """From a TrainConfig (or anything with its field names)."""
        return cls(model=cfg.model, layer=cfg.layer, dataset=cfg.dataset, tokens=cfg.tokens, context=cfg.context,
                   lm_dtype=cfg.dtype, store_dtype=getattr(cfg, "store_dtype", "bfloat16"), lm_batch=cfg.lm_batch,
                   cache_dir=cfg.cache_dir, rank=rank, world=world)

    @property
    def rank_tokens(self) -> int:
        return self.tokens // self.world

    def fields(self) -> dict:
        """Everything that determines the store's rows (its key and the first part of meta.json)."""
        return dict(model=self.model or DEFAULT_MODEL, layer=self.layer, dataset=self.dataset or DEFAULT_DATASET,
                    tokens=self.rank_tokens, context=self.context, rank=self.rank, world=self.world,
                    lm_dtype=self.lm_dtype, store_dtype=self.store_dtype)

    def directory(self) -> Path:
        root = Path(self.cache_dir) if self.cache_dir else cache_root() / "activations"
        return root / store_key(**self.fields())


def _load_lm(spec: ActivationSpec, device: str):
    model, tokenizer = load_model(spec.model, device=device, dtype=getattr(torch, spec.lm_dtype))
    n_layers = check_layer(model, spec.layer)
    return model, tokenizer, n_layers


def open_store(spec: ActivationSpec, device: str = "cpu", progress: bool = False) -> ActivationStore:
    """The complete store for `spec`: opened if it exists, else collected (resuming a killed collection)."""
    if spec.rank_tokens < 1:
        raise ValueError(f"--tokens {spec.tokens} cannot be split over {spec.world} ranks; raise --tokens")
    directory = spec.directory()
    try:
        return ActivationStore.open(directory)  # complete stores are read-only: no lock needed
    except StoreIncomplete:
        pass
    with store_lock(directory):
        try:
            return ActivationStore.open(directory)  # another process finished it while we waited
        except StoreIncomplete:
            pass
        model, tokenizer, n_layers = _load_lm(spec, device)
        d = model.config.hidden_size
        check_disk_space(directory.parent, spec.rank_tokens, d, spec.store_dtype)
        meta = {**spec.fields(), "n_layers": n_layers, "model_type": model.config.model_type,
                "token_range": f"windows {spec.rank}, {spec.rank} + {spec.world}, ... of the {spec.context}-token "
                               "windows of the dataset (BOS and pad positions dropped)"}
        writer = StoreWriter(directory, d, spec.store_dtype, meta)
        if writer.resumed and progress:
            print(f"resuming the interrupted activation store {directory} at {writer.rows_done:,} tokens")
        return collect_to_store(writer, model, tokenizer, iter_texts(spec.dataset), spec.layer, spec.rank_tokens,
                                context=spec.context, lm_batch=spec.lm_batch, device=device, rank=spec.rank,
                                world_size=spec.world, progress=progress)


def open_stream(spec: ActivationSpec, device: str = "cpu") -> tuple[StreamSource, dict]:
    """The rank's activation stream (no store): rows are computed by the LM when read."""
    model, tokenizer, n_layers = _load_lm(spec, device)
    source = StreamSource(model, tokenizer, lambda: iter_texts(spec.dataset), spec.layer, spec.rank_tokens,
                          context=spec.context, lm_batch=spec.lm_batch, device=device, rank=spec.rank,
                          world_size=spec.world)
    return source, {**spec.fields(), "n_layers": n_layers, "model_type": model.config.model_type, "streaming": True}


def held_out_count(n_rows: int, eval_tokens: int) -> int:
    return min(eval_tokens, n_rows // 10)


def training_rows(spec: ActivationSpec, streaming: bool, eval_tokens: int, device: str = "cpu",
                  progress: bool = False) -> tuple[object, torch.Tensor, int, dict]:
    """(training row source, held-out rows [n_eval, d] float32, first held-out token, meta)."""
    if streaming:
        stream, meta = open_stream(spec, device)
        n_eval = held_out_count(stream.n_tokens, eval_tokens)
        return RowRange(stream, n_eval, stream.n_tokens), stream.read(0, n_eval), 0, meta
    store = open_store(spec, device, progress)
    n, n_eval = store.n_tokens, held_out_count(store.n_tokens, eval_tokens)
    return RowRange(store, 0, n - n_eval), store.read(n - n_eval, n).float(), n - n_eval, store.meta
