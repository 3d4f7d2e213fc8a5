"""A weight's gradient written into memory kept between steps: reused only when nobody else holds it."""
import gc

import pytest
import torch

from aosae.ops import kept_gradients
from aosae.ops import sparse_coding as sc
from aosae.ops import sparse_coding_reference as ref


@pytest.fixture(autouse=True)
def fresh_pool():
    kept_gradients.release()
    yield
    kept_gradients.release()


def _weights(d=6, n=23, dtype=torch.float32):
    W_enc = torch.randn(n, d, dtype=dtype).t().requires_grad_()  # column-major, as the SAE stores it
    b_enc = (torch.randn(n, dtype=dtype) * 0.2).requires_grad_()
    b_dec = torch.randn(d, dtype=dtype).requires_grad_()
    W_dec = torch.randn(n, d, dtype=dtype).requires_grad_()
    return W_enc, b_enc, b_dec, W_dec


def _loss(x, params, k=3):
    W_enc, b_enc, b_dec, W_dec = params
    latents = sc.sparse_encode(x, W_enc, b_enc, b_dec, "topk", k)
    return (sc.sparse_decode(latents, W_dec, b_dec) - x).pow(2).sum()


def _reference_grads(x, params, k=3):
    """The same loss through the dense float64 reference, its gradients in float64."""
    W_enc, b_enc, b_dec, W_dec = [p.detach().double().requires_grad_() for p in params]
    _, x_hat = ref.encode_decode(x.double(), W_enc, b_enc, b_dec, W_dec, "topk", k)
    (x_hat - x.double()).pow(2).sum().backward()
    return W_enc.grad, W_dec.grad


def _storage(t):
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_second_step_writes_into_the_first_steps_memory(seed, dtype):
    params = _weights(dtype=dtype)
    W_enc, _, _, W_dec = params
    x = torch.randn(9, 6, dtype=dtype)
    _loss(x, params).backward()
    kept = [kept_gradients._kept[id(w)][1].data_ptr() for w in (W_enc, W_dec)]
    assert [_storage(W_enc.grad), _storage(W_dec.grad)] == kept  # taken as .grad without a copy
    for p in params:
        p.grad = None  # zero_grad(set_to_none=True)
    x2 = torch.randn(9, 6, dtype=dtype)
    _loss(x2, params).backward()
    assert [_storage(W_enc.grad), _storage(W_dec.grad)] == kept
    assert W_enc.grad.stride() == W_enc.stride()  # still the parameter's layout: kept as .grad without a copy
    want_enc, want_dec = _reference_grads(x2, params)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else {}
    torch.testing.assert_close(W_enc.grad.double(), want_enc, **tol)
    torch.testing.assert_close(W_dec.grad.double(), want_dec, **tol)


def test_stale_contents_never_leak_into_latents_without_entries(seed):
    params = _weights(n=40)
    W_enc, _, _, W_dec = params
    _loss(torch.randn(30, 6), params).backward()
    W_enc.grad.fill_(float("nan"))  # the kept memory now holds NaN
    W_dec.grad.fill_(float("nan"))
    for p in params:
        p.grad = None
    x = torch.randn(2, 6)  # 2 tokens × 3 latents: most of the 40 latents get no entry
    _loss(x, params).backward()
    want_enc, want_dec = _reference_grads(x, params)
    assert torch.isfinite(W_enc.grad).all() and torch.isfinite(W_dec.grad).all()
    torch.testing.assert_close(W_enc.grad.double(), want_enc, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(W_dec.grad.double(), want_dec, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("held", ["grad", "view", "autograd.grad", "storage"])
def test_memory_someone_holds_is_never_overwritten(seed, held):
    params = _weights()
    W_enc, _, _, W_dec = params
    x = torch.randn(9, 6)
    if held == "autograd.grad":
        kept, = torch.autograd.grad(_loss(x, params), [W_dec])
    else:
        _loss(x, params).backward()
        kept = {"grad": W_dec.grad, "view": W_dec.grad[2:5], "storage": W_dec.grad.untyped_storage()}[held]
    before = kept.clone() if held != "storage" else torch.tensor(kept.tolist())
    for p in params:
        p.grad = None
    _loss(torch.randn(9, 6), params).backward()
    assert torch.equal(kept if held != "storage" else torch.tensor(kept.tolist()), before)
    assert _storage(W_dec.grad) != kept.data_ptr()


def test_a_differentiable_backward_gets_fresh_differentiable_gradients(seed):
    """create_graph=True: the gradients are themselves differentiable (no product with out=), and
    their own gradient matches the dense reference's."""
    params = [p.detach().double().requires_grad_() for p in _weights()]
    W_enc, b_enc, b_dec, W_dec = params
    x = torch.randn(9, 6, dtype=torch.float64)
    g_enc, g_dec = torch.autograd.grad(_loss(x, params), [W_enc, W_dec], create_graph=True)
    assert g_enc.requires_grad and g_dec.requires_grad and not kept_gradients._kept
    got = torch.autograd.grad(g_enc.pow(2).sum() + g_dec.pow(2).sum(), [W_dec, b_dec])
    ref_params = [p.detach().requires_grad_() for p in params]
    _, x_hat = ref.encode_decode(x, *ref_params[:3], ref_params[3], "topk", 3)
    r_enc, r_dec = torch.autograd.grad((x_hat - x).pow(2).sum(), [ref_params[0], ref_params[3]], create_graph=True)
    want = torch.autograd.grad(r_enc.pow(2).sum() + r_dec.pow(2).sum(), [ref_params[3], ref_params[2]])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_gradients_still_accumulate_when_grad_is_not_reset(seed):
    params = _weights()
    _, _, _, W_dec = params
    x = torch.randn(9, 6)
    for _ in range(3):  # zero_grad(set_to_none=False) never drops .grad: the sum of three steps
        _loss(x, params).backward()
    _, want_dec = _reference_grads(x, params)
    torch.testing.assert_close(W_dec.grad.double(), 3 * want_dec, rtol=1e-4, atol=1e-4)


def test_what_is_kept_dies_with_its_weight_or_on_release(seed):
    params = _weights()
    _loss(torch.randn(9, 6), params).backward()
    assert len(kept_gradients._kept) == 2
    kept_gradients.release(params[3])
    assert len(kept_gradients._kept) == 1
    del params
    gc.collect()
    assert len(kept_gradients._kept) == 0


def test_fresh_memory_off_the_cap_and_under_grad_mode(seed, monkeypatch):
    W = torch.randn(5, 4)
    a = kept_gradients.gradient_buffer(W, 5, 4)  # (outside a backward grad mode is on)
    assert not kept_gradients._kept and a.shape == (5, 4)
    with torch.no_grad():
        a = kept_gradients.gradient_buffer(W, 5, 4)
        first = a.data_ptr()
        del a
        b = kept_gradients.gradient_buffer(W, 5, 4)
        assert len(kept_gradients._kept) == 1 and b.is_contiguous() and b.data_ptr() == first
        monkeypatch.setattr(kept_gradients, "KEPT_GRADIENT_BYTES", 8)
        kept_gradients.release()
        kept_gradients.gradient_buffer(W, 5, 4)
        assert not kept_gradients._kept


@pytest.mark.parametrize("counts", [[3, 0, 5, 1, 0, 7], [0, 0, 0], [4] * 9])
def test_latent_gradient_is_segment_gather_sum_by_latent(seed, counts):
    offsets = torch.zeros(len(counts) + 1, dtype=torch.long)
    offsets[1:] = torch.tensor(counts).cumsum(0)
    indices = torch.cat([torch.randperm(11)[:c] for c in counts]) if sum(counts) else torch.zeros(0, dtype=torch.long)
    w, table = torch.randn(indices.numel(), dtype=torch.float64), torch.randn(len(counts), 13, dtype=torch.float64)
    order, latent_offsets = sc.group_by(indices, 11)
    tokens = sc.token_of_entry(offsets, indices.numel())[order]
    weight = torch.zeros(11, 13, dtype=torch.float64)
    with torch.no_grad():
        got = sc.latent_gradient(latent_offsets, tokens, w[order], table, weight)
    torch.testing.assert_close(got, ref.segment_gather_sum(latent_offsets, tokens, w[order], table))


def test_the_sae_step_keeps_its_two_weights_gradients_until_released(seed):
    from aosae.nn.sae import SparseAutoencoder

    sae = SparseAutoencoder.from_dims(8, 32, activation="topk", top_k=4)
    for _ in range(2):
        sae.zero_grad(set_to_none=True)
        out = sae(torch.randn(16, 8), train=True)
        (out.x_hat.pow(2).sum() + out.sparse.values.sum()).backward()
    assert {id(sae.W_enc), id(sae.W_dec)} == set(kept_gradients._kept)
    from aosae.ops import latent_selection

    assert latent_selection._kept.buf is not None  # (the TopK forward's product tile)
    sae.release_kept_memory()
    assert not kept_gradients._kept and latent_selection._kept.buf is None
