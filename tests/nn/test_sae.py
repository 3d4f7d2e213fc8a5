"""SparseAutoencoder: shapes, math against explicit formulas, decoder constraints, save/load."""
import json

import pytest
import torch

from aosae.nn.sae import SAEConfig, SparseAutoencoder


def make(d_in=12, d_sae=20, **kw):
    torch.manual_seed(0)
    return SparseAutoencoder.from_dims(d_in, d_sae, **kw)


def test_shapes_init_and_formula():
    sae = make()
    assert sae.W_enc.shape == (12, 20) and sae.W_dec.shape == (20, 12)
    assert sae.b_enc.shape == (20,) and sae.b_dec.shape == (12,)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(20))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.t())
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    x = torch.randn(3, 5, 12)
    out = sae(x)
    x64 = x.double()
    pre = (x64 - sae.b_dec.double()) @ sae.W_enc.double() + sae.b_enc.double()
    f = pre.clamp_min(0)
    torch.testing.assert_close(out.pre_acts.double(), pre, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.latents.double(), f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.x_hat.double(), f @ sae.W_dec.double() + sae.b_dec.double(), rtol=1e-5, atol=1e-5)


def test_topk_keeps_k_largest():
    sae = make(activation="topk", top_k=3)
    x = torch.randn(7, 12)
    out = sae(x)
    assert ((out.latents != 0).sum(-1) <= 3).all()
    top = out.pre_acts.topk(3, dim=-1).values.clamp_min(0)
    torch.testing.assert_close(out.latents.sort(-1, descending=True).values[:, :3], top)


def test_topk_output_carries_its_indices_and_values():
    sae = make(activation="topk", top_k=4)
    x = torch.randn(2, 5, 12)
    out = sae(x)
    assert out.topk_indices.shape == out.topk_values.shape == (2, 5, 4)
    rebuilt = torch.zeros_like(out.latents).scatter(-1, out.topk_indices, out.topk_values)
    assert torch.equal(rebuilt, out.latents)
    assert torch.equal(sae.encode(x), out.latents)
    relu = make()(x)
    assert relu.topk_indices is None and relu.topk_values is None
    with pytest.raises(ValueError, match="TopK SAE"):
        make().select_topk(out.pre_acts)


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_penalty_from_topk_equals_the_dense_penalty(seed, similarity, reduction):
    # the trainer's TopK path (sparse op on (indices, values)) against the dense op on the latents
    from aosae.nn.loss import TopKOrthoLoss

    sae = SparseAutoencoder.from_dims(16, 120, activation="topk", top_k=6)
    with torch.no_grad():
        sae.b_enc.sub_(0.3)  # some kept slots are ReLU'd to zero
    x = torch.randn(50, 16)
    loss = TopKOrthoLoss(0.02, similarity=similarity, reduction=reduction)
    dense = loss(sae(x).latents)
    (g_dense,) = torch.autograd.grad(dense, sae.W_enc)
    out = sae(x)
    sparse = loss.from_topk(out.topk_indices, out.topk_values, sae.d_sae)
    (g_sparse,) = torch.autograd.grad(sparse, sae.W_enc)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_sparse, g_dense, rtol=1e-4, atol=1e-6 * float(g_dense.abs().max()))


def test_decoder_constraints():
    sae = make()
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(20, 1) * 3 + 0.1)
    sae.normalize_decoder_()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(20))
    sae.W_dec.grad = torch.randn(20, 12)
    sae.remove_parallel_grads_()
    dots = (sae.W_dec.grad * sae.W_dec).sum(1)
    assert dots.abs().max() < 1e-5
    # the orthogonal part is untouched: a random gradient keeps nonzero norm
    assert sae.W_dec.grad.norm() > 0.1


def test_geometric_median_init():
    sae = make(d_in=2, d_sae=4)
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 100.0]])
    sae.init_b_dec_(x, "mean")
    torch.testing.assert_close(sae.b_dec, x.mean(0))
    sae.init_b_dec_(x)  # the median is robust to the outlier
    assert sae.b_dec.norm() < 1.0


def test_save_load_roundtrip(tmp_path):
    sae = make(activation="topk", top_k=4, model_name="m", hook_layer=3, hook_name="blocks.3.hook_resid_post")
    with torch.no_grad():
        sae.b_enc.normal_()
    sae.save(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["activation_fn_kwargs"] == {"k": 4} and cfg["hook_layer"] == 3
    loaded = SparseAutoencoder.load(tmp_path / "sae")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(loaded, name), getattr(sae, name))
    sae.save(tmp_path / "sae")  # overwriting an existing directory works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(d_in=4, d_sae=0), "d_sae"),
        (dict(d_in=0, d_sae=4), "d_in"),
        (dict(d_in=4, d_sae=4, activation="gelu"), "activation"),
        (dict(d_in=4, d_sae=4, activation="topk"), "top_k"),
        (dict(d_in=4, d_sae=4, activation="topk", top_k=5), "top_k"),
        (dict(d_in=4, d_sae=4, top_k=2), "topk"),
    ],
)
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        SAEConfig(**kw)


def test_bad_input_shape_and_missing_dir(tmp_path):
    sae = make()
    with pytest.raises(ValueError, match="d_in|12"):
        sae(torch.randn(3, 11))
    with pytest.raises(FileNotFoundError):
        SparseAutoencoder.load(tmp_path)


def test_training_step_sends_topk_latents_to_the_sparse_op(seed, monkeypatch):
    # SAEObjective must not run the dense op on a TopK SAE's latents: the penalty comes from
    # (indices, values), equal to the dense penalty
    from aosae.nn.loss import TopKOrthoLoss
    from aosae.nn.tau import AdaptiveTau
    from aosae.training.step import SAEObjective

    sae = SparseAutoencoder.from_dims(16, 90, activation="topk", top_k=5)
    x = torch.randn(40, 16)
    with torch.no_grad():
        want = TopKOrthoLoss(0.02)(sae(x).latents)
    opt = torch.optim.AdamW(sae.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    objective = SAEObjective(sae, opt, sched, 0.04, TopKOrthoLoss(0.02), AdaptiveTau())

    def dense_call(*args, **kwargs):
        raise AssertionError("the dense penalty path ran on TopK latents")

    monkeypatch.setattr(TopKOrthoLoss, "forward", dense_call)
    losses = objective.losses(x)
    torch.testing.assert_close(losses.penalty, want, rtol=1e-5, atol=1e-7)
    objective.optimizer_step(losses.loss)
    assert sae.W_enc.grad is not None and bool(torch.isfinite(sae.W_enc.grad).all())
