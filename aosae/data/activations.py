"""LM activations at one layer: collection, on-disk cache, and a restorable shuffling buffer.

Collection runs the LM only up to the hooked layer and drops BOS and pad positions.
The cache stores activations as safetensors shards keyed by (model, layer, dataset,
tokens, context, rank, world size), so reruns and ablation arms skip the LM.

The buffer draws batch `step` from a permutation seeded by (seed, epoch): its
position is a pure function of the step, so a resumed run sees exactly the batches
an uninterrupted one would.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Optional

import torch
from safetensors.torch import load_file, save_file

from aosae.data.text import token_windows
from aosae.data.language_models import residual_at

SHARD_TOKENS = 262_144


def cache_key(**fields) -> str:
    blob = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


@torch.no_grad()
def collect_activations(
    model,
    tokenizer,
    texts: Iterable[str],
    layer: int,
    n_tokens: int,
    *,
    context: int = 128,
    lm_batch: int = 16,
    device: str | torch.device = "cpu",
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
) -> torch.Tensor:
    """Run the LM over `texts` and return n_tokens activations [n_tokens, d_model] float32 (CPU).

    BOS positions and pad tokens are excluded. Raises ValueError if the text runs out first.
    """
    pad = tokenizer.pad_token_id
    bos = tokenizer.bos_token_id
    chunks, have = [], 0
    windows = token_windows(texts, tokenizer, context, rank=rank, world_size=world_size)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_tokens, desc=f"activations L{layer}", unit="tok", dynamic_ncols=True)
    batch: list[torch.Tensor] = []

    def flush():
        nonlocal have
        ids = torch.stack(batch).to(device)
        batch.clear()
        hidden = residual_at(model, ids, torch.ones_like(ids), layer)  # [B, T, d]
        keep = torch.ones_like(ids, dtype=torch.bool)
        keep[:, 0] = False  # the BOS position: an outlier with a huge norm, not text
        if pad is not None and pad != bos:
            keep &= ids != pad
        acts = hidden[keep].float().cpu()
        acts = acts[: n_tokens - have]
        chunks.append(acts)
        have += acts.shape[0]
        if bar is not None:
            bar.update(acts.shape[0])

    for window in windows:
        batch.append(window)
        if len(batch) == lm_batch:
            flush()
            if have >= n_tokens:
                break
    if have < n_tokens and batch:
        flush()
    if bar is not None:
        bar.close()
    if have < n_tokens:
        raise ValueError(f"the dataset ran out after {have} tokens; ask for fewer tokens (--tokens) than {n_tokens}")
    return torch.cat(chunks)


def save_cache(directory: Path, acts: torch.Tensor, meta: dict) -> None:
    """Write acts [N, d] as safetensors shards + meta.json, atomically (temp dir + rename)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp", dir=directory.parent))
    try:
        n_shards = 0
        for n_shards, start in enumerate(range(0, acts.shape[0], SHARD_TOKENS), start=1):
            save_file({"acts": acts[start : start + SHARD_TOKENS].contiguous()}, str(tmp / f"shard_{n_shards - 1:05d}.safetensors"))
        (tmp / "meta.json").write_text(json.dumps({**meta, "shards": n_shards, "shape": list(acts.shape)}, indent=2))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_cache(directory: Path) -> Optional[torch.Tensor]:
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    parts = [load_file(str(directory / f"shard_{i:05d}.safetensors"))["acts"] for i in range(meta["shards"])]
    acts = torch.cat(parts)
    if list(acts.shape) != meta["shape"]:
        return None
    return acts


class ActivationBuffer:
    """Shuffled batches over activations [N, d] with a step-addressable position.

    batch(step) = acts[perm_e[o : o + B]] with e, o = position(step) and perm_e a
    permutation seeded by (seed, e); the last N mod B rows of each epoch are skipped.
    """

    def __init__(self, acts: torch.Tensor, batch_size: int, seed: int = 0):
        if acts.dim() != 2:
            raise ValueError(f"acts must be [n_tokens, d], got {tuple(acts.shape)}")
        if batch_size > acts.shape[0]:
            raise ValueError(
                f"batch size {batch_size} is larger than the activation buffer ({acts.shape[0]} tokens); "
                "lower --batch-size or raise --tokens"
            )
        self.acts, self.batch_size, self.seed = acts, batch_size, seed
        self.steps_per_epoch = acts.shape[0] // batch_size
        self._epoch, self._perm = -1, None

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, offset) of batch `step`."""
        return step // self.steps_per_epoch, (step % self.steps_per_epoch) * self.batch_size

    def batch(self, step: int) -> torch.Tensor:
        epoch, offset = self.position(step)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.acts.shape[0], generator=gen), epoch
        return self.acts[self._perm[offset : offset + self.batch_size]]
