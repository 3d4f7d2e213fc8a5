"""Hand-built SAEs whose behaviour is known exactly."""
import torch

from aosae.nn.sae import SparseAutoencoder


def identity_sae(d: int) -> SparseAutoencoder:
    """ReLU SAE with x̂ = relu(x) − relu(−x) = x: W_enc = [I, −I], W_dec = [I; −I], so each
    signed axis has its own latent."""
    sae = SparseAutoencoder.from_dims(d, 2 * d)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()
