"""Integrations with other SAE codebases (SAELens, dictionary_learning) and the plain example.

SAELens / dictionary_learning tests skip with a reason when those optional packages are not
installed (`bash .ci/install_integrations.sh`); the plain-PyTorch example test always runs.
"""
from __future__ import annotations

import importlib
import runpy
from pathlib import Path

import pytest
import torch

from aosae import topk_ortho_loss

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def aosae_sae():
    return importlib.import_module("aosae.nn.sae")


def _reference_penalty(acts: torch.Tensor, fraction: float = 0.005) -> torch.Tensor:
    """Per token (the default scale): Σ |C_ij| over the top-k pairs of C = fᵀf / B."""
    return topk_ortho_loss(acts, fraction=fraction, backend="reference")[0]


def _unit_decoder_latents(sae, acts: torch.Tensor) -> torch.Tensor:
    """A SAELens training SAE's latents as coefficients of unit-norm decoder rows (what it penalises)."""
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        return acts
    return acts * sae.W_dec.norm(dim=1)


# ----------------------------------------------------------------------------- plain PyTorch


def test_plain_pytorch_example_runs_and_penalises(capsys):
    """examples/plain_pytorch.py (the README's example) runs and its penalty is live."""
    namespace = runpy.run_path(str(ROOT / "examples" / "plain_pytorch.py"), run_name="__main__")
    assert "recon" in capsys.readouterr().out
    ortho, tau, f = namespace["ortho"], namespace["tau"], namespace["f"]
    assert tau.calibrated and 0.01 <= tau.tau <= 0.1
    assert (ortho.last_pairs.rows >= 0).any()
    # The module's penalty equals the reference selection's on the final latents.
    torch.testing.assert_close(ortho(f.detach()), _reference_penalty(f.detach()), rtol=1e-4, atol=1e-3)


# ----------------------------------------------------------------------------- SAELens


def _step_input(sae_in: torch.Tensor, coefficients: dict[str, float]):
    from sae_lens.saes.sae import TrainStepInput

    return TrainStepInput(
        sae_in=sae_in, coefficients=coefficients, dead_neuron_mask=None, n_training_steps=0, is_logging_step=False
    )


def _penalty_grad(out, param: torch.Tensor) -> torch.Tensor:
    """The orthogonality loss's gradient w.r.t. param, as the total loss's minus the rest's: a ReLU
    SAE's penalty sends a sparse gradient (on its support) that must join the decoder's dense one."""
    rest = out.loss - out.losses["orthogonality_loss"]
    total = torch.autograd.grad(out.loss, param, retain_graph=True)[0]
    return total - torch.autograd.grad(rest, param, retain_graph=True)[0]


def _training_sae(saelens, architecture: str, d_in: int = 16, d_sae: int = 96, **kwargs):
    if architecture == "aosae_topk":
        cfg = saelens.AosaeTopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=8, **kwargs)
        return saelens.AosaeTopKTrainingSAE(cfg)
    cfg = saelens.AosaeStandardTrainingSAEConfig(d_in=d_in, d_sae=d_sae, l1_coefficient=1e-3, **kwargs)
    return saelens.AosaeStandardTrainingSAE(cfg)


def test_saelens_registry_and_config_validation(saelens):
    from sae_lens.registry import get_sae_training_class

    assert get_sae_training_class("aosae_standard")[0] is saelens.AosaeStandardTrainingSAE
    assert get_sae_training_class("aosae_topk")[0] is saelens.AosaeTopKTrainingSAE
    with pytest.raises(ValueError, match="similarity"):
        saelens.AosaeStandardTrainingSAEConfig(d_in=4, d_sae=8, ortho_similarity="pearson")
    with pytest.raises(ValueError, match="min <= init <= max"):
        saelens.AosaeTopKTrainingSAEConfig(d_in=4, d_sae=8, k=2, tau_init=0.5)


@pytest.mark.parametrize(
    "architecture, extra",
    [("aosae_standard", {}), ("aosae_topk", {}), ("aosae_topk", {"rescale_acts_by_decoder_norm": False}),
     ("aosae_topk", {"use_sparse_activations": True})],
)
def test_saelens_penalty_in_loss_and_gradient_reaches_encoder(saelens, architecture, extra, monkeypatch):
    sae = _training_sae(saelens, architecture, tau_calibration_steps=1, **extra)
    with torch.no_grad():  # decoder rows of unequal norms: the penalty must weigh latents by them
        sae.W_dec.mul_(torch.rand(sae.W_dec.shape[0], 1) + 0.5)
    sae.train()
    if architecture == "aosae_topk":
        def dense_path(*_):
            raise AssertionError("a TopK SAE's latents must reach the penalty as (indices, values), not dense")

        monkeypatch.setattr(sae.orthogonality_loss, "forward", dense_path)
    coefficients = {name: (c.value if hasattr(c, "value") else c) for name, c in sae.get_coefficients().items()}
    assert coefficients[saelens.ORTHOGONALITY] == 1.0
    x = torch.randn(64, 16) * 3
    tau_before = sae.tau
    out = sae.training_forward_pass(_step_input(x, coefficients))

    assert set(out.losses) >= {"mse_loss", "orthogonality_loss"}
    acts = out.feature_acts.detach()
    latents = _unit_decoder_latents(sae, acts.to_dense() if acts.is_sparse else acts)
    expected = tau_before * _reference_penalty(latents)
    torch.testing.assert_close(out.losses["orthogonality_loss"].detach(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.loss, sum(out.losses.values()))
    assert out.metrics["tau"] == tau_before
    k = sae.orthogonality_loss.last_pairs.values.shape[0]
    mean_abs = topk_ortho_loss(latents, k, reduction="mean", backend="reference")[0]
    torch.testing.assert_close(out.metrics["orthogonality_mean_abs_c"], mean_abs, rtol=1e-4, atol=1e-7)

    grad = _penalty_grad(out, sae.W_enc)
    assert grad.abs().sum() > 0, "the orthogonality penalty's gradient does not reach W_enc"
    # ... and it is the gradient of τ·penalty computed through the reference selection.
    acts, _ = sae.encode_with_hidden_pre(x)
    acts = acts.to_dense() if acts.is_sparse else acts
    ref_grad = torch.autograd.grad(tau_before * _reference_penalty(_unit_decoder_latents(sae, acts)), sae.W_enc)[0]
    torch.testing.assert_close(grad, ref_grad, rtol=1e-3, atol=1e-5)

    # τ calibrated on step 1's MSE; step 2 applies τ ← clip(τ·L_target/L_mse).
    mse1 = out.losses["mse_loss"].item()
    out2 = sae.training_forward_pass(_step_input(torch.randn(64, 16), coefficients))
    mse2 = out2.losses["mse_loss"].item()
    assert sae.tau == pytest.approx(min(0.1, max(0.01, tau_before * mse1 / mse2)), rel=1e-5)


def test_saelens_coefficient_zero_removes_penalty(saelens):
    sae = _training_sae(saelens, "aosae_standard")
    out = sae.training_forward_pass(_step_input(torch.randn(32, 16), {"l1": 1e-3, saelens.ORTHOGONALITY: 0.0}))
    assert out.losses["orthogonality_loss"].item() == 0.0
    assert out.metrics["orthogonality_penalty"].item() > 0


def test_saelens_checkpoint_keeps_tau_state(saelens, tmp_path):
    from sae_lens import SAE

    sae = _training_sae(saelens, "aosae_topk", tau_calibration_steps=2)
    for recon in (1.0, 3.0, 0.5):
        sae.adaptive_tau.update(recon)
    sae.save_model(tmp_path / "ckpt")
    resumed = _training_sae(saelens, "aosae_topk", tau_calibration_steps=2)
    resumed.load_weights_from_checkpoint(tmp_path / "ckpt")
    assert resumed.adaptive_tau.state_dict() == sae.adaptive_tau.state_dict()
    assert torch.equal(resumed.W_enc, sae.W_enc)
    # A training checkpoint ("aosae_topk") also loads as a plain SAELens inference SAE.
    assert type(SAE.load_from_disk(str(tmp_path / "ckpt"))).__name__ == "TopKSAE"


def _tiny_lm_and_tokens(context: int = 16, vocab: int = 64):
    from datasets import Dataset
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    model = HookedTransformer(
        HookedTransformerConfig(
            n_layers=1, d_model=16, n_ctx=context, d_head=4, n_heads=4, d_mlp=32, d_vocab=vocab, act_fn="relu"
        )
    )
    dataset = Dataset.from_dict({"input_ids": torch.randint(0, vocab, (64, context)).tolist()})
    return model, dataset


@pytest.mark.parametrize("architecture", ["aosae_standard", "aosae_topk"])
def test_saelens_runner_trains_offline_with_penalty(saelens, architecture, tmp_path):
    """LanguageModelSAERunnerConfig + LanguageModelSAETrainingRunner on a tiny random model."""
    from sae_lens import SAE, LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig

    model, dataset = _tiny_lm_and_tokens()
    if architecture == "aosae_topk":
        sae_cfg = saelens.AosaeTopKTrainingSAEConfig(
            d_in=16, d_sae=64, k=4, tau_calibration_steps=2, normalize_decoder=True
        )
    else:
        sae_cfg = saelens.AosaeStandardTrainingSAEConfig(
            d_in=16, d_sae=64, l1_coefficient=1e-3, tau_calibration_steps=2, normalize_decoder=True
        )
    cfg = LanguageModelSAERunnerConfig(
        sae=sae_cfg,
        model_name="tiny-random",
        hook_name="blocks.0.hook_resid_post",
        dataset_path="local-random-tokens",
        is_dataset_tokenized=True,
        streaming=False,
        context_size=16,
        training_tokens=128 * 5,
        train_batch_size_tokens=128,
        store_batch_size_prompts=8,
        n_batches_in_buffer=16,
        device="cpu",
        logger=LoggingConfig(log_to_wandb=False),
        output_path=str(tmp_path / "out"),
        checkpoint_path=None,
        n_batches_for_norm_estimate=2,
        verbose=False,
    )
    runner = LanguageModelSAETrainingRunner(cfg, override_model=model, override_dataset=dataset)
    sae = runner.sae
    assert type(sae).__name__ == {"aosae_standard": "AosaeStandardTrainingSAE", "aosae_topk": "AosaeTopKTrainingSAE"}[
        architecture
    ]

    # Observe every real training step: the penalty is in the loss and reaches the encoder.
    seen = []
    original = sae.training_forward_pass

    def observed(step_input):
        out = original(step_input)
        grad = _penalty_grad(out, sae.W_enc)
        seen.append((out.losses["orthogonality_loss"].item(), out.loss.item(), sum(out.losses.values()).item(),
                     grad.abs().sum().item(), out.metrics["tau"]))
        return out

    sae.training_forward_pass = observed
    trained = runner.run()
    assert trained is sae and len(seen) == 5
    for ortho, loss, summed, grad_sum, _ in seen:
        assert ortho > 0 and grad_sum > 0
        assert loss == pytest.approx(summed, rel=1e-5)
    assert sae.adaptive_tau.calibrated  # 2 calibration steps, then τ adapts
    assert all(0.01 <= tau <= 0.1 for *_, tau in seen)
    # normalize_decoder=True kept decoder rows at unit norm (renormalised before each step; one Adam step since).
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=0.05)

    # The saved SAE is a plain SAELens SAE.
    loaded = SAE.load_from_disk(str(tmp_path / "out"))
    assert loaded.cfg.architecture() == architecture.removeprefix("aosae_")
    x = torch.randn(8, 16)
    torch.testing.assert_close(loaded(x), sae.eval()(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("architecture, saved_as", [("aosae_topk", "topk"), ("aosae_batchtopk", "jumprelu"),
                                                    ("aosae_matryoshka_batchtopk", "jumprelu")])
def test_saelens_example_script_runs(saelens, tmp_path, architecture, saved_as):
    """The example through LanguageModelSAETrainingRunner; the runner saves the plain inference SAE
    (BatchTopK ones as SAELens saves them: JumpReLU with the learned threshold)."""
    import json

    from sae_lens import SAE

    main = runpy.run_path(str(ROOT / "examples" / "saelens_train.py"))["main"]
    sae = main(["--architecture", architecture, "--d-sae", "64", "--k", "4", "--tokens", "512", "--out",
                str(tmp_path / "run")])
    assert json.loads((tmp_path / "run" / "cfg.json").read_text())["architecture"] == saved_as
    assert "orthogonality" in sae.get_coefficients()
    assert SAE.load_from_disk(str(tmp_path / "run")).cfg.architecture() == saved_as


def _random_aosae(aosae_sae, activation: str, d_in: int = 24, d_sae: int = 80, dtype=torch.float32):
    cfg = aosae_sae.SAEConfig(
        d_in=d_in, d_sae=d_sae, activation=activation, top_k=6 if activation == "topk" else None,
        model_name="tiny-random", hook_name="blocks.3.hook_resid_post", hook_layer=3, context_size=32,
    )
    sae = aosae_sae.SparseAutoencoder(cfg)
    with torch.no_grad():  # biases non-zero so that every weight matters in the comparison
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.5)
    return sae.to(dtype)


@pytest.mark.parametrize("activation", ["relu", "topk"])
def test_roundtrip_aosae_saelens_aosae(saelens, aosae_sae, activation, tmp_path):
    from sae_lens import SAE, StandardSAE, TopKSAE

    sae = _random_aosae(aosae_sae, activation)
    saelens.export_to_saelens(sae, tmp_path / "sl")
    loaded = SAE.load_from_disk(str(tmp_path / "sl"))
    assert isinstance(loaded, TopKSAE if activation == "topk" else StandardSAE)
    assert loaded.cfg.metadata.hook_name == "blocks.3.hook_resid_post"

    x = torch.randn(40, 24) * 2
    out = sae(x)
    torch.testing.assert_close(loaded.encode(x), out.latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded(x), out.x_hat, rtol=1e-5, atol=1e-5)

    back = saelens.import_from_saelens(tmp_path / "sl")
    assert isinstance(back, aosae_sae.SparseAutoencoder)
    assert back.cfg.activation == activation and back.cfg.top_k == sae.cfg.top_k
    assert back.cfg.hook_name == "blocks.3.hook_resid_post" and back.cfg.hook_layer == 3
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(back, name), getattr(sae, name)), name
    back_out = back(x)
    assert torch.equal(back_out.x_hat, out.x_hat) and torch.equal(back_out.latents, out.latents)


@pytest.mark.parametrize("activation", ["relu", "topk"])
def test_saelens_reads_aosae_native_save(saelens, aosae_sae, activation, tmp_path):
    """SparseAutoencoder.save's own directory is read by sae_lens.SAE.load_from_disk as is."""
    from sae_lens import SAE

    sae = _random_aosae(aosae_sae, activation)
    sae.save(tmp_path / "native")
    loaded = SAE.load_from_disk(str(tmp_path / "native"))
    assert loaded.cfg.architecture() == ("topk" if activation == "topk" else "standard")
    x = torch.randn(40, 24)
    torch.testing.assert_close(loaded(x), sae(x).x_hat, rtol=1e-5, atol=1e-5)


def test_import_saelens_topk_with_decoder_norm_rescaling(saelens, aosae_sae):
    """A SAELens TopK SAE trained with rescale_acts_by_decoder_norm: folded exactly on import."""
    from sae_lens import TopKSAE, TopKSAEConfig

    sl = TopKSAE(TopKSAEConfig(d_in=12, d_sae=40, k=5, rescale_acts_by_decoder_norm=True))
    with torch.no_grad():
        sl.W_dec.mul_(torch.rand(40, 1) * 2 + 0.2)  # non-unit decoder rows
        sl.b_enc.normal_(0, 0.1)
        sl.b_dec.normal_(0, 0.3)
    imported = saelens.from_saelens(sl)
    torch.testing.assert_close(imported.W_dec.norm(dim=1), torch.ones(40), rtol=1e-5, atol=1e-5)
    x = torch.randn(30, 12)
    torch.testing.assert_close(imported(x).x_hat, sl(x), rtol=1e-4, atol=1e-5)


def test_import_saelens_standard_without_b_dec_on_input(saelens, aosae_sae):
    from sae_lens import StandardSAE, StandardSAEConfig

    sl = StandardSAE(StandardSAEConfig(d_in=12, d_sae=40, apply_b_dec_to_input=False))
    with torch.no_grad():
        sl.b_enc.normal_(0, 0.1)
        sl.b_dec.normal_(0, 0.5)
    x = torch.randn(30, 12)
    for fold in (False, True):
        imported = saelens.from_saelens(sl, fold_decoder_norm=fold)
        torch.testing.assert_close(imported(x).x_hat, sl(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="normalize_activations"):
        sl.cfg.normalize_activations = "layer_norm"
        saelens.from_saelens(sl)


# ----------------------------------------------------------------------------- dictionary_learning


@pytest.mark.parametrize("kind", ["standard", "topk"])
def test_dictlearn_loss_adds_penalty_with_gradient(dictlearn, kind, monkeypatch):
    from dictionary_learning.trainers.standard import StandardTrainer
    from dictionary_learning.trainers.top_k import TopKTrainer

    common = dict(steps=10, activation_dim=16, dict_size=96, layer=0, lm_name="toy", device="cpu", seed=0, warmup_steps=1)
    if kind == "topk":
        trainer, base_cls = dictlearn.AosaeTopKTrainer(k=6, threshold_start_step=100, **common), TopKTrainer
    else:
        trainer, base_cls = dictlearn.AosaeStandardTrainer(l1_penalty=0.04, sparsity_warmup_steps=1, **common), StandardTrainer
    def dense_path(*_):
        raise AssertionError(f"{kind} latents must reach the penalty sparsely (TopK (indices, values), ReLU's support)")

    monkeypatch.setattr(trainer.orthogonality_loss, "forward", dense_path)
    x = torch.randn(64, 16) * 2
    tau = trainer.adaptive_tau.tau

    def unit(f):  # latents as coefficients of unit-norm decoder columns (the AutoEncoder starts at norm 0.1)
        return f * trainer.ae.decoder.weight.norm(dim=0)

    base = base_cls.loss(trainer, x, step=1)
    total = trainer.loss(x, step=1)
    f = trainer.ae.encode(x)
    torch.testing.assert_close(total - base, tau * _reference_penalty(unit(f)), rtol=1e-4, atol=1e-6)
    grad = torch.autograd.grad(total - base, trainer.ae.encoder.weight)[0]
    assert grad.abs().sum() > 0, "the penalty's gradient does not reach the encoder"
    log = trainer.loss(x, step=1, logging=True)
    assert log.losses["orthogonality_loss"] == pytest.approx(tau * _reference_penalty(unit(log.f)).item(), rel=1e-4)
    assert "decode" not in vars(trainer.ae) and "encode" not in vars(trainer.ae)  # observation hooks gone
    logged = trainer.get_logging_parameters()  # what trainSAE's logger reads
    assert logged["tau"] == tau
    torch.testing.assert_close(logged["orthogonality_penalty"], _reference_penalty(unit(log.f)), rtol=1e-4, atol=1e-8)
    k = trainer.orthogonality_loss.last_pairs.values.shape[0]
    mean_abs = topk_ortho_loss(unit(log.f), k, reduction="mean", backend="reference")[0]
    torch.testing.assert_close(logged["orthogonality_mean_abs_c"], mean_abs, rtol=1e-4, atol=1e-9)


def test_dictlearn_trainsae_runs_and_penalty_changes_training(dictlearn, tmp_path):
    from dictionary_learning.training import trainSAE

    steps, d, n = 4, 16, 64
    batches = [torch.randn(128, d) for _ in range(steps)]
    configs = []
    for trainer, extra in ((dictlearn.AosaeStandardTrainer, dict(l1_penalty=0.04, sparsity_warmup_steps=1)),
                           (dictlearn.AosaeTopKTrainer, dict(k=4, threshold_start_step=2))):
        for coefficient in (0.0, 10.0):
            configs.append(dict(trainer=trainer, steps=steps, activation_dim=d, dict_size=n, layer=0, lm_name="toy",
                                lr=1e-2, warmup_steps=1, device="cpu", seed=0, tau_calibration_steps=2,
                                orthogonality_coefficient=coefficient, **extra))
    trainSAE(data=iter(batches), trainer_configs=configs, steps=steps, save_dir=str(tmp_path), device="cpu")
    weights = [torch.load(tmp_path / f"trainer_{i}" / "ae.pt") for i in range(4)]
    for without, with_penalty in ((weights[0], weights[1]), (weights[2], weights[3])):
        assert all(torch.isfinite(v).all() for v in with_penalty.values())
        # Same seed, same data: only the penalty differs, so the encoders must differ.
        assert not torch.allclose(without["encoder.weight"], with_penalty["encoder.weight"])
    assert '"orthogonality_coefficient": 10.0' in (tmp_path / "trainer_1" / "config.json").read_text()


def test_dictlearn_example_script_runs(dictlearn, tmp_path):
    main = runpy.run_path(str(ROOT / "examples" / "dictionary_learning_train.py"))["main"]
    out = main(["--steps", "3", "--batch", "64", "--out", str(tmp_path / "dl")])
    assert all((Path(out) / f"trainer_{i}" / "ae.pt").is_file() for i in range(3))


# ----------------------------------------------------------------------------- supported versions


@pytest.mark.parametrize("module, outside", [("sae_lens", "6.53.2"), ("sae_lens", "7.0.0"),
                                             ("dictionary_learning", "0.2.0")])
def test_adapter_refuses_a_version_outside_its_range(module, outside, monkeypatch):
    """Importing an adapter with the library at a version outside its range raises, saying what to install."""
    library = pytest.importorskip(module, reason=f"optional package {module!r} is not installed: "
                                  "run `bash .ci/install_integrations.sh` to install it")
    adapter = importlib.import_module(f"aosae.integrations.{'saelens' if module == 'sae_lens' else module}")
    monkeypatch.setattr(library, "__version__", outside)
    distribution = {"sae_lens": "sae-lens", "dictionary_learning": "dictionary-learning"}[module]
    with pytest.raises(ImportError, match=rf"supports {distribution}>=.*'{outside}' is installed: pip install"):
        importlib.reload(adapter)  # stops at the check, before anything is redefined


def test_version_ranges_hold_the_installed_versions():
    from aosae.integrations import SUPPORTED_VERSIONS, _release, check_version

    assert _release("6.54.12") == (6, 54, 12) and _release("7.0.0rc1") == (7, 0, 0) and _release("dev") == ()
    for module in SUPPORTED_VERSIONS:
        if importlib.util.find_spec(module) is not None:
            check_version(module, importlib.import_module(module).__version__)
    with pytest.raises(ImportError, match="sae-lens>=6.54,<7"):
        check_version("sae_lens", "6.0.0")
