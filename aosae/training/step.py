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


def make_optimizer(params, lr: float) -> torch.optim.AdamW:
    """The trainer's AdamW (β = (0.9, 0.999), no weight decay), torch's fused kernel where the
    parameters allow it: one pass over each tensor and no temporaries. The per-op form allocates
    [d_sae, d_in] temporaries that a CPU process page-faults afresh every step: at d_sae 262144,
    d_in 576 its step took 1.2–1.7 s against the fused 0.18 s (benchmarks/NOTES.md, ninth pass)."""
    params = list(params)
    return TransposedAdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0, fused=_fused_kernel_takes(params))


def _fused_kernel_takes(params) -> bool:
    """Whether torch's fused AdamW takes these parameters (it checks only at the first step)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
        devices = _get_fused_kernels_supported_devices()
    except ImportError:  # another torch: its per-op AdamW
        return False
    return all(isinstance(p, torch.Tensor) and p.is_floating_point() and p.device.type in devices for p in params)


class TransposedAdamW(torch.optim.AdamW):
    """torch's AdamW, with a matrix stored transposed (SparseAutoencoder.W_enc: [d_in, d_sae] over
    a [d_sae, d_in] buffer, its gradient in the same layout) stepped through its transpose, which
    is contiguous: AdamW is elementwise, and torch's fused CPU kernel copies a non-contiguous
    tensor in and out every step (0.5 s of a 7 s step at d_sae 262144, d_in 576). The state is
    torch's, in the parameter's layout; checkpoints load as AdamW's do."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:  # run with the parameters as the model sees them
            with torch.enable_grad():
                loss = closure()
        flipped = [p for group in self.param_groups for p in group["params"]
                   if p.dim() == 2 and not p.is_contiguous() and p.t().is_contiguous()]
        done = []
        try:
            for p in flipped:
                self._transpose(p)
                done.append(p)
            # AdamW's own step, without the hooks torch wraps around it: they ran around this one,
            # with the parameters as the model sees them
            step = torch.optim.AdamW.step
            if getattr(step, "hooked", False):
                step = step.__wrapped__
            step(self)
        finally:
            for p in done:
                self._transpose(p)
        return loss

    def _transpose(self, p: torch.Tensor) -> None:
        p.data = p.data.t()
        if p.grad is not None:
            p.grad = p.grad.t()
        state = self.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if isinstance(state.get(key), torch.Tensor) and state[key].dim() == 2:
                state[key] = state[key].t()


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
