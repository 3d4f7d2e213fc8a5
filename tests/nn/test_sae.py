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
