"""aosae: sparse autoencoders with an adaptive, selective orthogonality penalty.

The core op `gram_topk` finds the k most correlated column pairs of a matrix without
materialising its Gram matrix; `TopKOrthoLoss` turns it into the penalty
τ · Σ_{(i,j) ∈ top-k} |C_ij| and `AdaptiveTau` adapts τ to reconstruction quality.

Packages, in the direction data flows: cli → training / eval → data, nn → ops → kernels.
"""
from aosae.nn.loss import TopKOrthoLoss, topk_ortho_loss
from aosae.nn.sae import SAEConfig, SAEOutput, SparseAutoencoder
from aosae.nn.tau import AdaptiveTau
from aosae.ops.gram_topk import TopKPairs, gram_topk, k_for_fraction, num_pairs
from aosae.ops.gram_topk_sparse import gram_topk_sparse

__version__ = "0.1.0"

__all__ = [
    "AdaptiveTau",
    "SAEConfig",
    "SAEOutput",
    "SparseAutoencoder",
    "TopKOrthoLoss",
    "TopKPairs",
    "gram_topk",
    "gram_topk_sparse",
    "k_for_fraction",
    "num_pairs",
    "topk_ortho_loss",
]
