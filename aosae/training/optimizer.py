"""The trainer's optimiser: AdamW (β = (0.9, 0.999), no weight decay) through torch's fused
kernel, with a matrix stored transposed stepped through its contiguous transpose. Used by the
trainer and by every benchmark that times its step (sparsify's arm included)."""
from __future__ import annotations

import torch


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
        # the fused kernel and the .data swaps leave the parameters' version counters as they were:
        # bump them, as torch's in-place updates do, so what was saved from a forward before this
        # step (e.g. a TopK SAEOutput's pre-activations, computed when read) sees the change
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    torch.autograd.graph.increment_version(p)
        return loss

    def _transpose(self, p: torch.Tensor) -> None:
        p.data = p.data.t()
        if p.grad is not None:
            p.grad = p.grad.t()
        state = self.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if isinstance(state.get(key), torch.Tensor) and state[key].dim() == 2:
                state[key] = state[key].t()
