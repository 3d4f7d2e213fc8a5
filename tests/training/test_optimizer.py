"""make_optimizer: torch's AdamW (fused where it can be), W_enc stepped through its contiguous transpose."""
import copy

import pytest
import torch

from aosae.nn.sae import SparseAutoencoder
from aosae.training.optimizer import TransposedAdamW, make_optimizer


def _steps(sae, opt, steps=4, closure=False):
    for i in range(steps):
        x = torch.randn(16, sae.d_in, generator=torch.Generator().manual_seed(100 + i))

        def loss_fn():
            opt.zero_grad()
            loss = sae(x).x_hat.sub(x).pow(2).sum()
            loss.backward()
            return loss

        if closure:
            opt.step(loss_fn)
        else:
            loss_fn()
            opt.step()


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("closure", [False, True])
def test_the_same_steps_as_torch_adamw(fused, closure):
    """Bit for bit torch's AdamW on an SAE whose W_enc is stored transposed; every tensor keeps
    its layout (parameters, gradients, the moments)."""
    torch.manual_seed(0)
    sae = SparseAutoencoder.from_dims(24, 96, activation="topk", top_k=6)
    assert not sae.W_enc.is_contiguous() and sae.W_enc.t().is_contiguous()  # the case this is for
    ref = copy.deepcopy(sae)
    kw = dict(lr=1e-2, betas=(0.9, 0.999), weight_decay=0.0, fused=fused)
    ours, theirs = TransposedAdamW(sae.parameters(), **kw), torch.optim.AdamW(ref.parameters(), **kw)
    _steps(sae, ours, closure=closure)
    _steps(ref, theirs, closure=closure)
    for (name, p), q in zip(sae.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), name
        assert p.stride() == q.stride() and p.grad.stride() == q.grad.stride(), name
        for key in ("exp_avg", "exp_avg_sq"):
            a, b = ours.state[p][key], theirs.state[q][key]
            assert torch.equal(a, b) and a.stride() == b.stride(), (name, key)


def test_resumes_from_its_state_dict():
    """A run stopped, its optimiser state saved and loaded into a fresh one, continues exactly."""
    torch.manual_seed(1)
    sae = SparseAutoencoder.from_dims(16, 64, activation="relu")
    whole = copy.deepcopy(sae)
    opt_whole = make_optimizer(whole.parameters(), 1e-2)
    _steps(whole, opt_whole, steps=6)
    opt = make_optimizer(sae.parameters(), 1e-2)
    _steps(sae, opt, steps=3)
    resumed = copy.deepcopy(sae)
    opt_resumed = make_optimizer(resumed.parameters(), 1e-2)
    opt_resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    for i in range(3, 6):  # the same batches as the whole run's last three
        x = torch.randn(16, resumed.d_in, generator=torch.Generator().manual_seed(100 + i))
        opt_resumed.zero_grad()
        resumed(x).x_hat.sub(x).pow(2).sum().backward()
        opt_resumed.step()
    for p, q in zip(resumed.parameters(), whole.parameters()):
        assert torch.equal(p, q)


def test_the_fused_kernel_sees_contiguous_tensors(monkeypatch):
    """What the change is for: torch's fused kernel gets W_enc, its gradient and moments as
    contiguous tensors (it copies others in and out), and the model sees W_enc as before."""
    seen = []
    fused = torch._fused_adamw_

    def spy(params, grads, exp_avgs, exp_avg_sqs, *args, **kwargs):
        seen.append([t.is_contiguous() for ts in (params, grads, exp_avgs, exp_avg_sqs) for t in ts])
        return fused(params, grads, exp_avgs, exp_avg_sqs, *args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adamw_", spy)
    sae = SparseAutoencoder.from_dims(12, 40, activation="topk", top_k=4)
    layout = sae.W_enc.stride()
    opt = make_optimizer(sae.parameters(), 1e-2)
    _steps(sae, opt, steps=2)
    assert seen and all(all(flags) for flags in seen)
    assert sae.W_enc.shape == (12, 40) and sae.W_enc.stride() == layout and sae.W_enc.grad.stride() == layout


def test_hooks_run_once_and_a_parameter_without_gradient_is_left_alone():
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])  # torch wraps AdamW.step with its hooks
    sae = SparseAutoencoder.from_dims(12, 40, activation="topk", top_k=4)
    sae.b_dec.requires_grad_(False)
    before = sae.b_dec.clone()
    opt = make_optimizer(sae.parameters(), 1e-2)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append(tuple(sae.W_enc.shape)))
    opt.register_step_post_hook(lambda o, a, k: calls.append(tuple(sae.W_enc.shape)))
    _steps(sae, opt, steps=2)
    assert calls == [(12, 40)] * 4  # once before and once after each step, W_enc as the model sees it
    assert torch.equal(sae.b_dec, before)


def test_a_failing_step_leaves_every_layout_as_it_was(monkeypatch):
    sae = SparseAutoencoder.from_dims(12, 40, activation="topk", top_k=4)
    opt = make_optimizer(sae.parameters(), 1e-2)
    _steps(sae, opt, steps=1)
    layout = (sae.W_enc.shape, sae.W_enc.stride(), opt.state[sae.W_enc]["exp_avg"].stride())

    def broken(*args, **kwargs):
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(torch, "_fused_adamw_", broken)
    with pytest.raises(RuntimeError, match="kernel failed"):
        opt.step()
    assert (sae.W_enc.shape, sae.W_enc.stride(), opt.state[sae.W_enc]["exp_avg"].stride()) == layout


def test_fused_where_torch_allows():
    sae = SparseAutoencoder.from_dims(8, 32, activation="relu")
    assert make_optimizer(sae.parameters(), 1e-3).param_groups[0]["fused"] is True
