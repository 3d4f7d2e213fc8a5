"""One optimiser step of the SAE objective, shared by `aosae train` and `aosae ablate`.

Per batch x [B, d_in] (already scaled, see TrainConfig.normalize_activations):

    L = ‖x − x̂‖²/B + λ · ‖f‖₁/B + τ · Σ_{(i,j) ∈ top-k} |C_ij|,   C = fᵀf / B

then AdamW with the decoder gradient projected off each unit-norm decoder row and the rows
renormalised after the step. Every term reads the SAE's sparse latents (SAEOutput.sparse): no
dense [B, d_sae] latents are built on the step's path (a ReLU SAE's dense first steps aside).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from aosae.nn.loss import TopKOrthoLoss
from aosae.nn.penalties import RedundancyPenalty
from aosae.nn.sae import SAEOutput, SparseAutoencoder, SparseLatents
from aosae.nn.tau import AdaptiveTau, BudgetTau


def _wide(t: torch.Tensor) -> torch.Tensor:
    """The loss terms are summed in fp32 (fp64 for an fp64 SAE)."""
    return t if t.dtype == torch.float64 else t.float()


def _cpu_float(t: torch.Tensor, cuda: bool) -> torch.Tensor:
    """On CPU the penalty reads fp32 (or fp64) latents; on GPU it reads autocast's bf16 as is."""
    return t if cuda or t.dtype in (torch.float32, torch.float64) else t.float()


class StepLosses(NamedTuple):
    loss: torch.Tensor
    recon: torch.Tensor
    l1: torch.Tensor
    penalty: torch.Tensor
    output: SAEOutput

    @property
    def latents(self) -> torch.Tensor:
        """The dense latents [B, d_sae] (built on access: the step itself reads the sparse form)."""
        return self.output.latents

    @property
    def sparse(self) -> SparseLatents:
        return self.output.sparse

    def l0(self) -> torch.Tensor:
        """Mean number of non-zero latents per token (a 0-d float tensor)."""
        if self.output.is_dense:
            return (self.output.latents > 0).sum(-1).float().mean()
        latents = self.output.sparse
        return (latents.values.detach() > 0).sum().float() / max(latents.batch, 1)


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
        """The loss terms of batch x [B, d_in], read from the sparse latents: the decoder and the
        encoder's backward follow the kept entries (TopK, BatchTopK, and ReLU once its latents
        are sparse; see SparseAutoencoder.forward). A BatchTopK SAE's inference threshold moves
        with each call (its EMA, as SAELens updates it in every training forward pass)."""
        cuda = x.device.type == "cuda"
        sae = self.sae
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            out = sae(x, train=True)
            batch = x.shape[0]
            recon = (x - _wide(out.x_hat)).pow(2).sum(-1).mean()
            if out.is_dense:  # a ReLU SAE's first steps: dense latents, dense products
                dense = out.latents
                l1 = _wide(dense).abs().sum(-1).mean()
                finite = bool(torch.isfinite(dense).all())
            else:
                sparse = out.sparse
                if sae.cfg.activation == "batchtopk":
                    sae.update_threshold_(sparse)
                l1 = _wide(sparse.values).abs().sum() / batch
                finite = bool(torch.isfinite(sparse.values).all())
            if not finite:  # the op rejects NaN input: let the guard report it
                penalty = torch.full((), float("nan"), device=x.device)
            else:
                penalty = self._penalty(out, cuda)
        loss = recon + self.l1_coeff * l1 + self.tau.tau * penalty
        return StepLosses(loss, recon, l1, penalty, out)

    def _penalty(self, out: SAEOutput, cuda: bool) -> torch.Tensor:
        """τ's term from the latents in the form the forward pass produced them. On GPU the
        latents stay in autocast's bf16: the kernels read bf16 with tensor cores and accumulate in
        fp32 (an fp32 copy would double the bytes and lose the tensor cores)."""
        n = self.sae.d_sae
        ortho = self.ortho
        if ortho is None:
            return torch.zeros((), device=out.x_hat.device)
        if out.is_dense:
            # ReLU's dense phase: C = fᵀf / B per token; the gradient stays on f's non-zeros (all
            # the ReLU passes on), so no dense [B, n] penalty gradient is built
            dense = _cpu_float(out.latents, cuda)
            return ortho(dense, self.sae.W_dec) if isinstance(ortho, RedundancyPenalty) else ortho.on_support(dense)
        if isinstance(ortho, RedundancyPenalty):  # the variants that also read the decoder: CSR rows
            sparse = out.sparse
            return ortho.from_sparse(sparse._replace(values=_cpu_float(sparse.values, cuda)), self.sae.W_dec)
        if out.topk_indices is not None:  # TopK: fixed-length rows, the sparse op on (indices, values)
            values = _cpu_float(out.topk_values, cuda)
            return ortho.from_topk(out.topk_indices.reshape(-1, self.sae.cfg.top_k),
                                   values.reshape(-1, self.sae.cfg.top_k), n)
        sparse = out.sparse  # BatchTopK, or ReLU once sparse: ragged rows
        return ortho.from_sparse(sparse._replace(values=_cpu_float(sparse.values, cuda)), n)

    def optimizer_step(self, loss: torch.Tensor, reduce_grads: Callable[[], None] = lambda: None) -> None:
        """Backward, gradient all-reduce (DDP), decoder-row projection, AdamW, schedule, renorm."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        reduce_grads()
        self.sae.remove_parallel_grads_()
        self.opt.step()
        self.sched.step()
        self.sae.normalize_decoder_()
