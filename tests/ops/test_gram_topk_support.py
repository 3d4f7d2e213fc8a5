"""gram_topk_on_support: same pairs as gram_topk, gradient kept on the input's non-zeros."""
from __future__ import annotations

import pytest
import torch

from aosae import gram_topk
from aosae.nn.loss import TopKOrthoLoss
from aosae.nn.sae import SparseAutoencoder
from aosae.ops import gram_topk_support
from aosae.ops.gram_topk_support import gram_topk_on_support


@pytest.fixture(autouse=True)
def _needs_extension(seed):
    if not gram_topk_support.available(torch.zeros(2, 2)):
        pytest.skip("aosae._C without gram_topk_support_backward_cpu: rebuild with pip install --no-build-isolation -e .")


def relu_latents(B, n, dtype=torch.float64, outliers=0):
    pre = torch.randn(B, n, dtype=dtype)
    pre[:outliers] += 2.5  # a few rows firing on most latents, like outlier tokens
    return pre, lambda p: torch.relu(p - 1.0)


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
@pytest.mark.parametrize("backend", ["auto", "sparse", "cpu", "reference"])
@pytest.mark.parametrize("B,n,outliers", [(40, 70, 0), (64, 300, 3), (7, 33, 1)])
def test_gradient_through_relu_equals_gram_topk(similarity, backend, B, n, outliers):
    pre, act = relu_latents(B, n, outliers=outliers)
    w = torch.randn(n, dtype=pre.dtype)
    k = max(1, n * (n - 1) // 40)
    grads, selections = [], []
    for op in (gram_topk, gram_topk_on_support):
        p = pre.clone().requires_grad_()
        a = act(p)
        x_hat = a @ torch.randn(n, 5, dtype=pre.dtype, generator=torch.Generator().manual_seed(1))
        pairs = op(a, k, similarity=similarity, backend=backend)
        loss = x_hat.pow(2).sum() + (pairs.values.abs() * w[pairs.rows.clamp_min(0)]).sum()
        loss.backward()
        grads.append(p.grad)
        selections.append(pairs)
    for got, want in zip(selections[1], selections[0]):
        assert torch.equal(got, want)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_raw_gradient_is_sparse_and_matches_on_the_support(similarity):
    pre, act = relu_latents(30, 50, dtype=torch.float32, outliers=2)
    a = act(pre)
    k = 60
    leaf = a.clone().requires_grad_()
    (g_dense,) = torch.autograd.grad(gram_topk(leaf, k, similarity=similarity).values.abs().sum(), leaf)
    (g_support,) = torch.autograd.grad(gram_topk_on_support(leaf, k, similarity=similarity).values.abs().sum(), leaf)
    assert g_support.is_sparse and g_support.dtype == a.dtype
    support = a != 0
    dense = g_support.to_dense()
    assert torch.equal(dense[~support], torch.zeros_like(dense[~support]))
    torch.testing.assert_close(dense[support], g_dense[support], rtol=1e-6, atol=1e-6)
    assert (g_dense[~support] != 0).any()  # gram_topk's contract: zeros of a get their gradient


def test_loss_on_support_matches_forward_and_falls_back():
    pre, act = relu_latents(48, 90, dtype=torch.float32, outliers=1)
    loss = TopKOrthoLoss(0.02)
    a = act(pre)
    assert torch.equal(loss.on_support(a), loss(a))  # no grad: the same op
    half = a.to(torch.bfloat16)  # not float32/64: plain forward
    assert torch.equal(loss.on_support(half), loss(half))
    with pytest.raises(ValueError, match="k must be in"):
        gram_topk_on_support(a, 10**6)


def test_sae_parameter_gradients_equal_the_dense_path():
    # the trainer's ReLU path: penalty after the decoder, so autograd adds the sparse
    # gradient into the decoder's dense one in place
    torch.manual_seed(3)
    x = torch.randn(256, 24)
    grads = []
    for method in ("forward", "on_support"):
        torch.manual_seed(4)
        sae = SparseAutoencoder.from_dims(24, 96)
        torch.nn.init.normal_(sae.W_enc, std=0.3)
        out = sae(x)
        recon = (x - out.x_hat).pow(2).sum(-1).mean()
        penalty = getattr(TopKOrthoLoss(0.01), method)(out.latents)
        (recon + 0.1 * penalty).backward()
        grads.append({name: p.grad.clone() for name, p in sae.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_latents_are_refused(bad):
    pre, act = relu_latents(20, 30, dtype=torch.float32)
    a = act(pre)
    a[3, 7] = bad
    with pytest.raises(ValueError, match="NaN|Inf|finite"):
        gram_topk_on_support(a.requires_grad_(), 10)
