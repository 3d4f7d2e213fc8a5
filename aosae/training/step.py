"""One optimiser step of the SAE objective, shared by `aosae train` and `aosae ablate`.

Per batch x [B, d_in] (already scaled, see TrainConfig.normalize_activations):

    L = ‖x − x̂‖²/B + λ · ‖f‖₁/B + τ · Σ_{(i,j) ∈ top-k} |C_ij|,   C = fᵀf / B

then AdamW with the decoder gradient projected off each unit-norm decoder row and the rows
renormalised after the step.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from aosae.nn.loss import TopKOrthoLoss
from aosae.nn.penalties import RedundancyPenalty
from aosae.nn.sae import SparseAutoencoder
from aosae.nn.tau import AdaptiveTau, BudgetTau


class StepLosses(NamedTuple):
    loss: torch.Tensor
    recon: torch.Tensor
    l1: torch.Tensor
    penalty: torch.Tensor
    latents: torch.Tensor


class SAEObjective:
    """The loss of one batch and the optimiser step that follows it."""

    def __init__(
        self,
        sae: SparseAutoencoder,
        opt: torch.optim.Optimizer,
        sched: torch.optim.lr_scheduler.LRScheduler,
        l1_coeff: float,
        ortho: Optional[TopKOrthoLoss | RedundancyPenalty],
        tau: AdaptiveTau | BudgetTau,
    ):
        self.sae, self.opt, self.sched = sae, opt, sched
        self.l1_coeff, self.ortho, self.tau = l1_coeff, ortho, tau

    def losses(self, x: torch.Tensor) -> StepLosses:
        cuda = x.device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            out = self.sae(x)
            recon = (x - out.x_hat.float()).pow(2).sum(-1).mean()
            l1 = out.latents.float().abs().sum(-1).mean()
            # On GPU the latents stay in autocast's bf16: the kernels read bf16 with tensor cores
            # and accumulate in fp32 (an fp32 copy would double the bytes and lose the tensor cores)
            latents = out.latents if cuda else out.latents.float()
            if not bool(torch.isfinite(out.latents).all()):  # the op rejects NaN input: let the guard report it
                penalty = torch.full((), float("nan"), device=x.device)
            elif isinstance(self.ortho, RedundancyPenalty):  # variants that also read the decoder
                penalty = self.ortho(latents, self.sae.W_dec)
            elif isinstance(self.ortho, TopKOrthoLoss) and out.topk_indices is not None:
                # TopK SAE: the kept (indices, values) go to the sparse op, never a dense [B, n] pass
                values = out.topk_values if cuda else out.topk_values.float()
                penalty = self.ortho.from_topk(out.topk_indices, values, self.sae.d_sae)
            elif self.ortho is not None:
                # ReLU: C = fᵀf / B per token; the gradient stays on f's non-zeros (all the ReLU
                # passes on), so no dense [B, n] penalty gradient is built
                penalty = self.ortho.on_support(latents)
            else:
                penalty = torch.zeros((), device=x.device)
        loss = recon + self.l1_coeff * l1 + self.tau.tau * penalty
        return StepLosses(loss, recon, l1, penalty, out.latents)

    def optimizer_step(self, loss: torch.Tensor, reduce_grads: Callable[[], None] = lambda: None) -> None:
        """Backward, gradient all-reduce (DDP), decoder-row projection, AdamW, schedule, renorm."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        reduce_grads()
        self.sae.remove_parallel_grads_()
        self.opt.step()
        self.sched.step()
        self.sae.normalize_decoder_()
