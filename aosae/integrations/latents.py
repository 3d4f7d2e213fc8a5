"""How an SAE's latents reach the penalty: the one place where both adapters (SAELens,
dictionary_learning) hand latents to TopKOrthoLoss, in the form the architecture already holds.

    form      what the architecture holds                         entry                          gradient
    topk      (indices, values) [B, k] of a TopK activation       TopKOrthoLoss.from_topk        on the kept entries
    rows      ragged CSR rows (offsets, indices, values):         TopKOrthoLoss.from_sparse      on the kept entries
              BatchTopK's batch-wide selection                    (never padded)
    support   dense latents whose activation's backward zeroes    TopKOrthoLoss.on_support       at the non-zeros
              the gradient off their non-zeros (ReLU, Gated's
              Heaviside gate × ReLU, a TopK / BatchTopK scatter,
              matching pursuit's scatter)
    window    JumpReLU: the non-zeros plus the zeros whose        from_sparse with explicit      at the non-zeros and
              pre-activation lies in the threshold STE's window   zero-valued entries            in the window
              |pre − θ| < bandwidth/2
    dense     anything else, and JumpReLU while its window        TopKOrthoLoss.forward          everywhere [B, n]
              holds more than WINDOW_DENSE_SHARE of the entries

Why JumpReLU needs its window: JumpReLU's backward (SAELens and dictionary_learning alike) gives
the threshold θ_i the gradient −(θ_i/bw)·Σ_t rect((pre_ti − θ_i)/bw)·∂L/∂f_ti, which reads
∂L/∂f_ti also where f_ti = 0 (pre_ti in (θ_i − bw/2, θ_i]). The penalty's gradient there is
not zero: ∂P/∂f_ti = Σ_j sign(C_ij)·f_tj / B over the selected pairs (i, j) whose partner j is
active in row t. So the non-zeros alone would drop part of θ's gradient; the window keeps
exactly the entries the STE reads (float64 tests: tests/integrations/test_support_gradients.py).

Every form takes the latents as coefficients of unit-norm decoder rows, g = f·‖W_dec_i‖ (weights
None where they already are), so rescaling a decoder row against its latent cannot dodge it.
"""
from __future__ import annotations

from typing import Optional

import torch

from aosae.nn.loss import TopKOrthoLoss

FORMS = ("topk", "rows", "support", "window", "dense")


# Above this share of [B, n] entries in JumpReLU's non-zeros + window (early training, where the
# threshold starts near 0 and about half the latents fire), the window's co-active pairs
# (O(B·L²)) cost far more than the dense kernels (SAELens JumpReLU, d_sae 2048, B 512, half the
# latents in the window: 1775 ms per step through the window's pairs, 109 ms dense). The dense
# path is exact for any activation, so the switch changes only the cost.
WINDOW_DENSE_SHARE = 0.05


class _ScaleColumns(torch.autograd.Function):
    """g = f · w (w [n] over the columns) whose backward also takes on_support's sparse COO
    gradient: torch's own mul cannot (it views the sparse gradient to broadcast w)."""

    @staticmethod
    def forward(ctx, f: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(f, w)
        return f * w

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        f, w = ctx.saved_tensors
        grad_f = grad_w = None
        if grad.layout == torch.sparse_coo:
            grad = grad.coalesce()
            (rows, cols), vals = grad.indices(), grad.values()
            if ctx.needs_input_grad[0]:
                grad_f = torch.sparse_coo_tensor(grad.indices(), vals * w[cols], f.shape, is_coalesced=True,
                                                 check_invariants=False)
            if ctx.needs_input_grad[1]:
                grad_w = torch.zeros_like(w).index_add_(0, cols, vals * f[rows, cols])
        else:
            if ctx.needs_input_grad[0]:
                grad_f = grad * w
            if ctx.needs_input_grad[1]:
                grad_w = (grad * f).sum(0)
        return grad_f, grad_w


def scale_columns(f: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    """f · weights[None, :] (f unchanged for weights None), safe for a sparse gradient."""
    return f if weights is None else _ScaleColumns.apply(f, weights.to(f.dtype))


def csr_offsets(rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Row pointers [n_rows + 1] of entries whose row ids `rows` are sorted ascending."""
    offsets = torch.zeros(n_rows + 1, dtype=torch.int64, device=rows.device)
    offsets[1:] = torch.bincount(rows, minlength=n_rows).cumsum(0)
    return offsets


def masked_penalty(
    loss: TopKOrthoLoss, f: torch.Tensor, mask: torch.Tensor, weights: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """The penalty of f [B, n] whose gradient is taken at the entries of `mask` (a superset of
    f's non-zeros; entries of mask where f is 0 enter as explicit zeros)."""
    rows, cols = mask.nonzero(as_tuple=True)  # row-major: CSR order
    values = f[rows, cols]
    if weights is not None:
        values = values * weights.to(f.dtype)[cols]
    return loss.from_sparse((csr_offsets(rows, f.shape[0]), cols, values), f.shape[1])


def jumprelu_window(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """Where JumpReLU's threshold STE reads the latents' gradient: rect((pre − θ)/bw) ≠ 0,
    computed as both libraries compute it (strict bounds at ±1/2)."""
    u = (pre - threshold.to(pre.dtype)) / bandwidth
    return (u > -0.5) & (u < 0.5)


def _check_latents(latents, n_latents: int) -> None:
    """The adapters' latents: a tensor [..., n_latents] (the SAE's d_sae) on a real device."""
    if latents is None:
        return
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"latents must be a torch.Tensor [batch, d_sae={n_latents}], got {type(latents).__name__}")
    if latents.dim() < 1 or latents.shape[-1] != n_latents:
        raise ValueError(f"latents must have the SAE's width d_sae={n_latents} in their last dimension, got shape "
                         f"{tuple(latents.shape)}: pass the latents this SAE's encode() returned")
    if latents.device.type == "meta":
        raise ValueError("latents is a meta tensor (a shape without values): the penalty needs the values; pass "
                         "the latents on cpu or cuda")


def penalty(
    loss: TopKOrthoLoss,
    form: str,
    n_latents: int,
    *,
    latents: Optional[torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
    topk: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    rows: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
    window: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The penalty of one step's latents in `form` (see the module docstring).

    n_latents: the SAE's width; latents: dense f [B, n] (every form but topk/rows; sparse COO is densified);
    weights: ‖W_dec_i‖ [n] or None; topk: (indices, values) [B, k]; rows: (offsets, indices,
    values) CSR; window: JumpReLU's STE window [B, n] (bool).
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    _check_latents(latents, n_latents)
    needed = {"topk": ("topk", topk), "rows": ("rows", rows), "window": ("window", window)}.get(form)
    if needed is not None and needed[1] is None:
        raise ValueError(f"the {form!r} form needs {needed[0]}= (see aosae.integrations.latents.penalty)")
    if form in ("topk", "rows"):
        *head, values = topk if form == "topk" else rows
        if weights is not None:
            values = values * weights.to(values.dtype)[head[-1]]
        if form == "topk":
            return loss.from_topk(head[0], values, n_latents)
        return loss.from_sparse((head[0], head[1], values), n_latents)
    if latents is None:
        raise ValueError(f"the {form!r} form needs latents= (the dense latents [B, n])")
    f = latents.to_dense() if latents.is_sparse else latents
    flat = f.dim() == 2  # a 2-D f is used as is: a reshape node would refuse on_support's sparse gradient
    if not flat:
        f = f.reshape(-1, f.shape[-1])
    if form == "support" and flat:
        return loss.on_support(scale_columns(f, weights))
    if form in ("support", "window"):
        mask = f != 0 if form == "support" else (f != 0) | window.reshape(f.shape)
        if form == "support" or int(torch.count_nonzero(mask)) <= WINDOW_DENSE_SHARE * mask.numel():
            return masked_penalty(loss, f, mask, weights)
    return loss(scale_columns(f, weights))
