"""What SparseAutoencoder.forward returns: the reconstruction, the kept latents in the form the
forward pass made them (sparse, or dense in a ReLU SAE's dense phase), and the other forms built
only when read."""
from __future__ import annotations

from typing import Optional

import torch

from aosae.ops.sparse_coding import SparseLatents


class SAEOutput:
    """What SparseAutoencoder.forward returns.

    x_hat [..., d_in]: the reconstruction. pre_acts [..., d_sae]: the encoder pre-activations. A
    sparse forward pass (TopK; BatchTopK in training; ReLU once its latents are sparse) computes
    them again when they are first read (its selection does not keep them; on CPU outside autocast
    TopK never writes them whole, aosae.ops.latent_selection.tiled_topk, and the others write them
    into a buffer reused every call), which must come
    before its weights or input change (checked by version counters, which aosae's optimizer
    bumps; writes through `.data` or torch's fused optimizers escape the check); their last bits
    may differ from those the tiled selection compared.
    sparse: the kept latents as SparseLatents over the flattened tokens (offsets, indices, values
    differentiable, n_latents). latents [..., d_sae]: f, dense; built from `sparse` on first
    access (a ReLU SAE in its dense phase has it from the start and builds `sparse` on access),
    so a training step that reads only `sparse` never builds it.

    TopK SAEs: topk_indices [..., top_k] int64 and topk_values [..., top_k] (ReLU'd,
    differentiable), latents[..., topk_indices] = topk_values; None for the other activations.
    """

    __slots__ = ("x_hat", "_pre", "_shape", "_sparse", "_latents", "_top_k", "_dense")

    def __init__(self, x_hat, pre_acts, sparse: Optional[SparseLatents] = None, latents=None, top_k=None, *,
                 shape: Optional[tuple] = None):
        """pre_acts: a tensor, or a callable that computes it on first access (then `shape`, the
        latents' [..., d_sae], is required)."""
        if sparse is None and latents is None:
            raise ValueError("SAEOutput needs the sparse latents, the dense latents or both")
        if callable(pre_acts) and shape is None:
            raise ValueError("SAEOutput: pre-activations computed on access need the latents' shape")
        self.x_hat, self._pre = x_hat, pre_acts
        self._shape = tuple(pre_acts.shape) if shape is None else tuple(shape)
        self._sparse, self._latents, self._top_k = sparse, latents, top_k
        self._dense = sparse is None

    @property
    def pre_acts(self) -> torch.Tensor:
        if callable(self._pre):
            self._pre = self._pre()
        return self._pre

    @property
    def is_dense(self) -> bool:
        """Whether the forward pass produced dense latents (a ReLU SAE in its dense phase)."""
        return self._dense

    @property
    def sparse(self) -> SparseLatents:
        if self._sparse is None:  # dense phase of a ReLU SAE: read the non-zeros of f
            f = self._latents.reshape(-1, self._latents.shape[-1])
            rows, cols = (f != 0).nonzero(as_tuple=True)
            offsets = rows.new_zeros(f.shape[0] + 1)
            offsets[1:] = torch.bincount(rows, minlength=f.shape[0]).cumsum(0)
            self._sparse = SparseLatents(offsets, cols, f[rows, cols], f.shape[1])
        return self._sparse

    @property
    def latents(self) -> torch.Tensor:
        if self._latents is None:
            self._latents = self._sparse.to_dense().reshape(self._shape)
        return self._latents

    @property
    def topk_indices(self) -> Optional[torch.Tensor]:
        if self._top_k is None:
            return None
        return self.sparse.indices.reshape(*self._shape[:-1], self._top_k)

    @property
    def topk_values(self) -> Optional[torch.Tensor]:
        if self._top_k is None:
            return None
        return self.sparse.values.reshape(*self._shape[:-1], self._top_k)
