"""Modules: the sparse autoencoder (sae.py), the orthogonality penalty (loss.py) and its
adaptive weight τ (tau.py). They call aosae.ops and nothing above it."""
