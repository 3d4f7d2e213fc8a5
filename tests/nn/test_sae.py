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


@pytest.mark.parametrize("d_in", [12, 2**19 + 3, 2**18 + 1])  # one block; blocks of one row; of three, the last of two
def test_parallel_grads_removed_blockwise(d_in):
    """Every row's gradient loses exactly its part along that row, whatever the blocks, a zero row
    and rows of any norm included (float64 oracle of g − (g·w / ‖w‖²) w)."""
    sae = make(d_in=d_in, d_sae=5)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(5, 1) * 3 + 0.1)
        sae.W_dec[2] = 0
    grad = torch.randn(5, d_in)
    sae.W_dec.grad = grad.clone()
    sae.remove_parallel_grads_()
    w, g = sae.W_dec.detach().double(), grad.double()
    want = g - (g * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True).clamp_min(1e-24) * w
    torch.testing.assert_close(sae.W_dec.grad.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.W_dec.grad[2], grad[2])  # a zero row has no direction to remove


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


def test_save_into_existing_directory_keeps_other_files(tmp_path):
    """save() into a run directory replaces only cfg.json + weights: checkpoints, metrics, the
    user's own files and a sibling named like a backup (DIR.old) all survive (review #21)."""
    run = tmp_path / "run"
    make().save(run)
    (run / "checkpoints" / "step_3").mkdir(parents=True)
    (run / "checkpoints" / "step_3" / "state.json").write_text("{}")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "notes.txt").write_text("mine")
    (tmp_path / "run.old").mkdir()
    (tmp_path / "run.old" / "backup.txt").write_text("also mine")
    sae = make()
    with torch.no_grad():
        sae.b_enc.fill_(0.25)
    sae.save(run)
    assert (run / "checkpoints" / "step_3" / "state.json").read_text() == "{}"
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n' and (run / "notes.txt").read_text() == "mine"
    assert (tmp_path / "run.old" / "backup.txt").read_text() == "also mine"
    assert sorted(p.name for p in run.iterdir()) == ["cfg.json", "checkpoints", "metrics.jsonl", "notes.txt",
                                                     "sae_weights.safetensors"]  # no temp files left
    assert torch.equal(SparseAutoencoder.load(run).b_enc, sae.b_enc)
    make().save(tmp_path / "fresh")  # a new directory: also next to run.old, which stays
    assert (tmp_path / "run.old" / "backup.txt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "run", "run.old"]


def test_save_onto_a_file_is_refused(tmp_path):
    target = tmp_path / "x.jsonl"
    target.write_text('{"text": "user data"}\n')
    with pytest.raises(ValueError, match="is a file, not a directory"):
        make().save(target)
    assert target.read_text() == '{"text": "user data"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.jsonl"]


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


def test_load_names_an_unsupported_activation(tmp_path):
    make().save(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps({**cfg, "activation_fn_str": "gelu"}))
    with pytest.raises(ValueError, match="activation_fn_str 'gelu' is not supported: aosae SAEs use relu, topk, batchtopk"):
        SparseAutoencoder.load(tmp_path / "sae")


def test_load_converts_weights_of_another_dtype_than_cfg_with_a_warning(tmp_path):
    from safetensors.torch import load_file, save_file

    sae = make()
    sae.save(tmp_path / "sae")
    path = tmp_path / "sae" / "sae_weights.safetensors"
    save_file({k: v.half() if k == "W_enc" else v for k, v in load_file(str(path)).items()}, str(path))
    with pytest.warns(UserWarning, match="W_enc is float16 but .*cfg.json says dtype float32: converted to float32"):
        loaded = SparseAutoencoder.load(tmp_path / "sae")
    assert loaded.W_enc.dtype == torch.float32
    torch.testing.assert_close(loaded.W_enc, sae.W_enc.half().float())


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


# ----------------------------------------------------------------------------- the sparse step
def _objective(sae, ortho):
    from aosae.nn.tau import AdaptiveTau
    from aosae.training.step import SAEObjective

    opt = torch.optim.AdamW(sae.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return SAEObjective(sae, opt, sched, 0.04, ortho, AdaptiveTau(0.05))


STEP_CASES = [  # (activation, top_k, b_enc shift): ReLU shifted down is past its dense phase
    ("topk", 5, 0.0), ("batchtopk", 4, 0.0), ("relu", None, -2.0), ("relu", None, 0.0)]


@pytest.mark.parametrize("warm", [False, True])
@pytest.mark.parametrize("activation, k, shift", STEP_CASES)
def test_sparse_step_has_the_dense_steps_loss_and_gradients(seed, activation, k, shift, warm):
    # float64: the sparse step (sparse encode/decode, penalty from the kept entries) against the
    # dense reference step (dense latents, dense products, the dense penalty), every parameter.
    # warm: after one forward, which sends a sparse ReLU through the kept pre-activation buffer
    from aosae.nn.loss import TopKOrthoLoss
    from aosae.ops import sparse_coding_reference as ref

    sae = SparseAutoencoder.from_dims(16, 200, activation=activation, top_k=k, dtype="float64")
    with torch.no_grad():
        sae.b_enc.normal_(shift, 0.3)
        sae.b_dec.normal_(0, 0.1)
    x = torch.randn(48, 16, dtype=torch.float64)
    if warm:
        with torch.no_grad():
            sae(x)
        assert sae._dense_last == (activation != "relu" or shift == 0.0)
    losses = _objective(sae, TopKOrthoLoss(0.01)).losses(x)
    assert losses.output.is_dense == (activation == "relu" and shift == 0.0)
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    got = torch.autograd.grad(losses.loss, params)

    f, x_hat = ref.encode_decode(x, sae.W_enc, sae.b_enc, sae.b_dec, sae.W_dec, activation, k)
    recon = (x - x_hat).pow(2).sum(-1).mean()
    l1 = f.abs().sum(-1).mean()
    penalty = TopKOrthoLoss(0.01)(f)
    want_loss = recon + 0.04 * l1 + 0.05 * penalty
    want = torch.autograd.grad(want_loss, params)
    for name, a, b in [("recon", losses.recon, recon), ("l1", losses.l1, l1), ("penalty", losses.penalty, penalty),
                       ("loss", losses.loss, want_loss)]:
        torch.testing.assert_close(a, b.detach(), rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")
    for name, a, b in zip(["W_enc", "b_enc", "W_dec", "b_dec"], got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(losses.l0(), (f != 0).sum(-1).double().mean().float())


@pytest.mark.parametrize("tile", [7, 64])
def test_wide_topk_step_selects_in_tiles_with_the_dense_steps_loss_and_gradients(seed, monkeypatch, tile):
    """A TopK SAE wider than TOPK_TILE (made small here) selects from column tiles of the encoder's
    product and never writes [B, n]: the same float64 loss and gradients as the dense reference."""
    from aosae.ops import sparse_coding

    monkeypatch.setattr(sparse_coding, "TOPK_TILE", tile)
    calls, real = [], sparse_coding.tiled_topk
    monkeypatch.setattr(sparse_coding, "tiled_topk", lambda *a: calls.append(a[-1]) or real(*a))
    test_sparse_step_has_the_dense_steps_loss_and_gradients(seed, "topk", 5, 0.0, False)
    assert calls == [tile]


def test_topk_pre_acts_are_computed_when_read_and_guard_the_weights(seed):
    sae = make(activation="topk", top_k=3)
    x = torch.randn(4, 5, 12)
    out = sae(x)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    torch.testing.assert_close(out.pre_acts, pre)
    assert out.pre_acts is out.pre_acts  # computed once
    (g,) = torch.autograd.grad(out.pre_acts.sum(), sae.b_enc)  # differentiable, as the forward's
    torch.testing.assert_close(g, torch.full_like(g, 20.0))
    stale = sae(x)
    with torch.no_grad():
        sae.b_enc.add_(1.0)
    with pytest.raises(RuntimeError, match="read out.pre_acts before changing them"):
        stale.pre_acts
    assert stale.topk_indices.shape == (4, 5, 3)  # what the forward kept needs no pre-activations
    from aosae.training.optimizer import make_optimizer  # the trainer's fused AdamW

    opt = make_optimizer(sae.parameters(), 1e-3)
    stepped = sae(x)
    stepped.x_hat.pow(2).sum().backward()
    opt.step()
    with pytest.raises(RuntimeError, match="read out.pre_acts before changing them"):
        stepped.pre_acts


def test_batchtopk_training_pre_acts_are_computed_when_read_and_its_buffer_leaks_nothing(seed, monkeypatch):
    """BatchTopK's training forward selects from pre-activations written into the kept tile
    (latent_selection.tile_buffer): reading out.pre_acts computes them again, the kept values are
    no view of that buffer (a later forward leaves them as they were), and the ragged rows have no
    topk_indices."""
    from aosae.ops import latent_selection, sparse_coding

    tiles = []
    monkeypatch.setattr(sparse_coding, "tile_buffer",
                        lambda *a: tiles.append(latent_selection.tile_buffer(*a)) or tiles[-1])
    sae = make(d_sae=40, activation="batchtopk", top_k=4)
    x = torch.randn(9, 12)
    out = sae(x, train=True)
    values = out.sparse.values.detach().clone()
    torch.testing.assert_close(out.pre_acts, (x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    assert sae(torch.randn(9, 12), train=True).sparse.values.numel() > 0
    assert len(tiles) == 2 and tiles[0] is tiles[1]  # both forwards wrote into the one kept tile
    assert torch.equal(out.sparse.values.detach(), values)
    assert out.topk_indices is None
    top = torch.relu(out.pre_acts).reshape(-1).topk(36).values
    torch.testing.assert_close(out.sparse.values.detach().sort(descending=True).values, top[top > 0])
    latent_selection.release_tile_buffer()


def test_wide_topk_pre_acts_read_back_hold_the_selection(seed, monkeypatch):
    """Through the tiles (TOPK_TILE made small), the pre-activations read back hold the kept latents:
    their top k per token are the kept values."""
    from aosae.ops import sparse_coding

    monkeypatch.setattr(sparse_coding, "TOPK_TILE", 6)
    sae = make(d_sae=40, activation="topk", top_k=4)
    with torch.no_grad():
        out = sae(torch.randn(9, 12))
    assert not out.pre_acts.requires_grad  # (the forward's grad mode)
    top = out.pre_acts.topk(4, dim=-1).values.clamp_min(0)
    torch.testing.assert_close(out.topk_values.sort(-1, descending=True).values, top, rtol=1e-6, atol=1e-6)


def _topk_ortho():
    from aosae.nn.loss import TopKOrthoLoss

    return TopKOrthoLoss(0.01)


def _coact_x_decoder():
    from aosae.nn.penalties import RedundancyPenalty

    return RedundancyPenalty("coact_x_decoder", 0.3, pair_rule="coactive")


@pytest.mark.parametrize("penalty", [_topk_ortho, _coact_x_decoder])
@pytest.mark.parametrize("activation, k, shift", STEP_CASES[:3])
def test_sparse_step_never_builds_dense_latents(seed, activation, k, shift, penalty, monkeypatch):
    from aosae.nn import sae as sae_module
    from aosae.ops.sparse_coding import SparseLatents

    def no_dense(*args, **kwargs):
        raise AssertionError("the step built dense [B, d_sae] latents")

    sae = SparseAutoencoder.from_dims(16, 300, activation=activation, top_k=k)
    with torch.no_grad():
        sae.b_enc.fill_(shift)
    objective = _objective(sae, penalty())
    monkeypatch.setattr(SparseLatents, "to_dense", no_dense)
    monkeypatch.setattr(sae_module.SAEOutput, "latents", property(no_dense))
    losses = objective.losses(torch.randn(64, 16))
    if penalty is _coact_x_decoder:
        assert float(losses.penalty.detach()) > 0
    objective.optimizer_step(losses.loss)
    assert bool(torch.isfinite(sae.W_enc.grad).all()) and sae.W_enc.grad.abs().sum() > 0


REDUNDANCY_CASES = [("coactivation", "coactive"), ("coact_x_decoder", "all"), ("decoder_on_coactive", "coactive"),
                    ("decoder", "all")]


@pytest.mark.parametrize("activation, k, shift", STEP_CASES)
@pytest.mark.parametrize("kind, pair_rule", REDUNDANCY_CASES)
def test_sparse_step_with_a_redundancy_penalty_matches_the_dense_step(seed, activation, k, shift, kind, pair_rule):
    # float64: RedundancyPenalty read from the sparse latents (from_sparse) against the dense
    # reference step (dense latents, the penalty's dense route), every parameter
    from aosae.nn.penalties import RedundancyPenalty
    from aosae.ops import sparse_coding_reference as ref

    sae = SparseAutoencoder.from_dims(16, 120, activation=activation, top_k=k, dtype="float64")
    with torch.no_grad():
        sae.b_enc.normal_(shift, 0.3)
    x = torch.randn(40, 16, dtype=torch.float64)
    fraction = 0.01 if pair_rule == "all" else 0.3
    losses = _objective(sae, RedundancyPenalty(kind, fraction, pair_rule=pair_rule)).losses(x)
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    got = torch.autograd.grad(losses.loss, params)

    f, x_hat = ref.encode_decode(x, sae.W_enc, sae.b_enc, sae.b_dec, sae.W_dec, activation, k)
    penalty = RedundancyPenalty(kind, fraction, pair_rule=pair_rule, backend="reference")(f, sae.W_dec)
    want_loss = (x - x_hat).pow(2).sum(-1).mean() + 0.04 * f.abs().sum(-1).mean() + 0.05 * penalty
    want = torch.autograd.grad(want_loss, params)
    torch.testing.assert_close(losses.penalty, penalty.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(losses.loss, want_loss.detach(), rtol=1e-10, atol=1e-12)
    for name, a, b in zip(["W_enc", "b_enc", "W_dec", "b_dec"], got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_batchtopk_threshold_training_inference_and_files(seed, tmp_path):
    from aosae.ops import sparse_coding_reference as ref

    sae = make(d_in=12, d_sae=40, activation="batchtopk", top_k=3, hook_name="blocks.0.hook_resid_post")
    x = torch.randn(30, 12)
    assert float(sae.threshold) == -1.0  # unset: inference falls back to the batch's top B·k
    torch.testing.assert_close(sae.encode(x), ref.dense_latents(sae.pre_activations(x), "batchtopk", 3))
    objective = _objective(sae, None)
    lows = []
    for _ in range(3):
        batch = torch.randn(30, 12)
        losses = objective.losses(batch)
        lows.append(float(losses.sparse.values.detach().min()))
        assert losses.sparse.values.numel() == 90 and not losses.output.is_dense
    want = lows[0]
    for low in lows[1:]:
        want = 0.99 * want + 0.01 * low
    assert abs(float(sae.threshold) - want) < 1e-6
    # inference: JumpReLU at the threshold, as SAELens loads it
    f = sae.encode(x)
    torch.testing.assert_close(f, ref.dense_latents(sae.pre_activations(x), "jumprelu", threshold=sae.threshold))
    out = sae(x)
    torch.testing.assert_close(out.latents, f)
    torch.testing.assert_close(out.x_hat, f @ sae.W_dec + sae.b_dec, rtol=1e-5, atol=1e-5)
    sae.save(tmp_path / "btk")
    cfg = json.loads((tmp_path / "btk" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["activation_fn_str"] == "batchtopk"
    assert cfg["activation_fn_kwargs"] == {"k": 3}
    loaded = SparseAutoencoder.load(tmp_path / "btk")
    assert loaded.cfg.activation == "batchtopk" and loaded.cfg.top_k == 3
    assert torch.equal(loaded.threshold, sae.threshold)
    torch.testing.assert_close(loaded(x).x_hat, out.x_hat)
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed: bash .ci/install_integrations.sh saelens")
    sl = sae_lens.SAE.load_from_disk(str(tmp_path / "btk"))
    assert sl.cfg.architecture() == "jumprelu"
    with torch.no_grad():
        torch.testing.assert_close(sl.encode(x), f, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sl(x), out.x_hat, rtol=1e-5, atol=1e-5)


def test_relu_goes_dense_and_back_through_the_kept_buffer(seed, monkeypatch):
    """A sparse ReLU forward selects from pre-activations written into the kept tile; one that finds
    them too dense there falls back to the dense path in the same call, and the next call starts
    dense. What it returns is no view of the tile."""
    from aosae.ops import latent_selection, sparse_coding

    tiles = []
    monkeypatch.setattr(sparse_coding, "tile_buffer", lambda *a: tiles.append(a) or latent_selection.tile_buffer(*a))
    sae = make(d_in=12, d_sae=50)
    x = torch.randn(30, 12)
    assert sae(x).is_dense and tiles == []  # the first call: dense pre-activations, returned
    with torch.no_grad():
        sae.b_enc.fill_(-3.0)
    assert not sae(x).is_dense and tiles == []  # a sparse call from the dense path
    out = sae(x)  # through the kept tile
    assert not out.is_dense and len(tiles) == 1
    values = out.sparse.values.detach().clone()
    torch.testing.assert_close(out.latents, torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc))
    assert not sae(torch.randn(30, 12)).is_dense and len(tiles) == 2
    assert torch.equal(out.sparse.values.detach(), values)  # no view of the tile the next call wrote
    with torch.no_grad():
        sae.b_enc.fill_(3.0)  # dense again: found so in the tile, then the dense path
    dense = sae(x)
    assert dense.is_dense and len(tiles) == 3 and sae._dense_last
    torch.testing.assert_close(dense.latents, torch.relu(dense.pre_acts))
    assert sae(x).is_dense and len(tiles) == 3  # and the next call starts dense
    latent_selection.release_tile_buffer()


@pytest.mark.parametrize("max_nnz", [None, 0, 40, 10**6])
@pytest.mark.parametrize("chunk", [1, 13, 1 << 22])
def test_positive_rows_are_relus_selection(seed, chunk, max_nnz, monkeypatch):
    from aosae.ops import batch_top, latent_selection

    monkeypatch.setattr(batch_top, "SCAN_CHUNK", chunk)
    pre = torch.randn(17, 11)
    pre[3] = 0.0  # zeros are not kept
    pre[5] = -1.0  # an empty row
    got = latent_selection.positive_rows(pre, max_nnz)
    if max_nnz is not None and int((pre > 0).sum()) > max_nnz:
        assert got is None
        return
    for a, b in zip(got, latent_selection.select(pre, "relu")):
        assert torch.equal(a, b)


def test_output_reads_sparse_and_dense_forms_alike(seed):
    sae = make(d_in=12, d_sae=50)  # ReLU at init: dense phase
    x = torch.randn(3, 4, 12)
    out = sae(x)
    assert out.is_dense and out.latents.shape == (3, 4, 50)
    sparse = out.sparse
    torch.testing.assert_close(sparse.to_dense(), out.latents.reshape(12, 50))
    assert out.is_dense  # reading the sparse form does not change what the forward produced
    with torch.no_grad():
        sae.b_enc.fill_(-3.0)
    out = sae(x)
    assert not out.is_dense
    torch.testing.assert_close(out.latents, torch.relu(out.pre_acts))


@pytest.mark.parametrize("activation, k", [("topk", 4), ("batchtopk", 4), ("relu", None)])
def test_metrics_read_the_sparse_form_like_the_dense(seed, activation, k):
    from aosae.eval.metrics import ReconstructionStats, latent_density

    sae = make(d_in=12, d_sae=40, activation=activation, top_k=k)
    with torch.no_grad():
        sae.b_enc.fill_(-0.3)
    x = torch.randn(50, 12)
    with torch.no_grad():
        out = sae(x)
    dense, sparse = ReconstructionStats(), ReconstructionStats()
    dense.update(x, out.x_hat, out.latents)
    sparse.update(x, out.x_hat, out.sparse)
    assert sparse.result() == pytest.approx(dense.result(), rel=1e-9)
    assert torch.equal(latent_density(out.sparse), latent_density(out.latents))
