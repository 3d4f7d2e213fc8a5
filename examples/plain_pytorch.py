"""Adding the selective orthogonality penalty to any PyTorch SAE training loop (toy data)."""
import torch
from aosae import AdaptiveTau, TopKOrthoLoss

d, n = 64, 256
enc, dec = torch.nn.Linear(d, n), torch.nn.Linear(n, d)
opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=1e-3)
# Penalty per token: Σ|C_ij| over the top 0.5% latent pairs of C = fᵀf / B (scale="batch_sum": the paper's fᵀf)
ortho, tau = TopKOrthoLoss(fraction=0.005), AdaptiveTau(init=0.05, max=0.1, calibration_steps=10)
for step in range(30):
    x = torch.randn(256, d)
    f = torch.relu(enc(x))  # latents [batch, n]
    recon = (dec(f) - x).pow(2).sum(-1).mean()
    # the one added term; f comes out of a ReLU, so only the penalty's gradient at f's non-zeros
    # reaches the encoder: on_support keeps it there (exact, no dense [batch, n] gradient)
    loss = recon + 0.04 * f.abs().sum(-1).mean() + tau.tau * ortho.on_support(f)
    opt.zero_grad(), loss.backward(), opt.step()
    dec.weight.data /= dec.weight.norm(dim=0, keepdim=True)  # unit-norm decoder column per latent
    tau.update(recon.detach())
print(f"recon {recon.item():.3f}  penalty {ortho(f).item():.4g}  tau {tau.tau:.3f}")
