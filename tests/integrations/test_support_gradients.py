"""The penalty's support path gives every parameter the dense path's gradient, per architecture (float64).

Each wrapped architecture hands the penalty its latents in a sparse form (aosae.integrations.latents:
TopK (indices, values), BatchTopK's ragged rows, the support of ReLU / Gated / BatchTopK latents,
JumpReLU's support plus its threshold STE's window). That is only right where the activation's
backward never reads the latents' gradient outside those entries. Here each architecture runs its
own training loss twice on the same weights and batch, once with its form and once with the dense
path (TopKOrthoLoss.forward on the dense latents: the gradient at every entry), and the penalty's
gradient w.r.t. every parameter must agree. The penalty's gradient is taken as the total loss's
minus the loss's without it: a support path's sparse gradient must join the decoder's dense one.

JumpReLU is also checked the other way: with the support alone (its non-zeros), the threshold's
gradient differs, since the STE reads the gradient at zeros within bandwidth/2 of the threshold.
"""
from __future__ import annotations

import pytest
import torch

D_IN, D_SAE, TOKENS = 16, 48, 40

SAELENS_CASES = [
    ("standard", {"l1_coefficient": 1e-3}),
    ("gated", {"l1_coefficient": 1e-3}),
    ("topk", {"k": 6}),
    ("topk", {"k": 6, "rescale_acts_by_decoder_norm": False}),
    ("abstopk", {"k": 6}),
    ("batchtopk", {"k": 6}),
    ("batchtopk", {"k": 6, "rescale_acts_by_decoder_norm": False}),
    ("matryoshka_batchtopk", {"k": 6, "matryoshka_widths": [16, D_SAE]}),
    ("jumprelu", {"jumprelu_bandwidth": 0.5}),  # a wide window: many zero latents lie in it
    ("jumprelu", {"jumprelu_bandwidth": 0.5, "jumprelu_ste_to_input": True}),
    ("matching_pursuit", {}),
]


@pytest.fixture(autouse=True)
def _seed(monkeypatch):
    torch.manual_seed(0)
    # these tiny batches have dense JumpReLU windows: keep them on the window's route, which is
    # what is tested here (test_dense_window_takes_the_dense_route checks the switch)
    from aosae.integrations import latents

    monkeypatch.setattr(latents, "WINDOW_DENSE_SHARE", 1.0)


def test_dense_window_takes_the_dense_route(monkeypatch):
    """Above WINDOW_DENSE_SHARE, JumpReLU's window goes through TopKOrthoLoss.forward (the dense
    kernels, exact for any activation), with the window route's value and gradient."""
    from aosae.integrations import latents
    from aosae.nn.loss import TopKOrthoLoss

    pre = torch.randn(TOKENS, D_SAE, dtype=torch.float64)
    threshold = torch.full((D_SAE,), 0.2, dtype=torch.float64)
    window = latents.jumprelu_window(pre, threshold, 0.5)
    results = {}
    for share in (1.0, 0.05):
        monkeypatch.setattr(latents, "WINDOW_DENSE_SHARE", share)
        calls = []
        loss = TopKOrthoLoss(fraction=0.05)
        forward = loss.forward
        monkeypatch.setattr(loss, "forward", lambda f: calls.append(1) or forward(f))
        f = (pre * (pre > threshold)).requires_grad_(True)
        value = latents.penalty(loss, "window", D_SAE, latents=f, window=window)
        (grad,) = torch.autograd.grad(value, f)
        results[share] = (value.detach(), grad.to_dense(), bool(calls))
    assert float(window.double().mean()) > 0.05, "the test needs a dense window"
    assert not results[1.0][2] and results[0.05][2]
    torch.testing.assert_close(results[0.05][0], results[1.0][0], rtol=1e-12, atol=0)
    mask = (pre > threshold) | window  # the window route's gradient lives on the mask; dense is exact
    torch.testing.assert_close(results[0.05][1] * mask, results[1.0][1], rtol=1e-10, atol=1e-12)


def _randomise(module: torch.nn.Module, threshold_name: str = "threshold") -> None:
    """Non-zero biases, decoder rows of unequal norms, thresholds spread over [0, 0.3]."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(threshold_name):
                p.uniform_(0.0, 0.3)
            elif p.dim() == 1:
                p.normal_(0, 0.1)
            elif name in ("W_dec", "decoder.weight"):
                scale = torch.rand(p.shape[0] if name == "W_dec" else p.shape[1], dtype=p.dtype) + 0.5
                p.mul_(scale[:, None] if name == "W_dec" else scale[None, :])


def _difference(with_penalty: dict, without: dict) -> dict:
    return {name: with_penalty[name] - without[name] for name in with_penalty}


def _assert_same(support: dict, dense: dict, what: str) -> None:
    assert any(g.abs().sum() > 0 for g in dense.values()), f"{what}: the penalty has no gradient at all"
    for name, g in dense.items():
        tol = dict(rtol=1e-5, atol=1e-7) if g.dtype == torch.float32 else dict(rtol=1e-8, atol=1e-11)
        torch.testing.assert_close(support[name], g, **tol, msg=lambda m, n=name: f"{what}, {n}: {m}")


# ----------------------------------------------------------------------------- SAELens


def _saelens_penalty_grads(sae, x: torch.Tensor, form: str) -> dict:
    from sae_lens.saes.sae import TrainStepInput

    from aosae.integrations.saelens import ORTHOGONALITY

    sae.latent_form = form
    coefficients = {name: (c.value if hasattr(c, "value") else c) for name, c in sae.get_coefficients().items()}
    coefficients[ORTHOGONALITY] = 1.0
    out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients=coefficients, dead_neuron_mask=None,
                                                   n_training_steps=0, is_logging_step=False))
    named = [(n, p) for n, p in sae.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    total = torch.autograd.grad(out.loss, params, retain_graph=True, allow_unused=True)
    rest = torch.autograd.grad(out.loss - out.losses["orthogonality_loss"], params, allow_unused=True)
    return {n: (t if t is not None else torch.zeros_like(p)) - (r if r is not None else torch.zeros_like(p))
            for (n, p), t, r in zip(named, total, rest)}


@pytest.mark.parametrize("architecture, extra", SAELENS_CASES,
                         ids=[f"{a}-{'-'.join(f'{k}={v}' for k, v in e.items() if k != 'k')}" for a, e in SAELENS_CASES])
def test_saelens_support_gradient_equals_dense(saelens, architecture, extra):
    from sae_lens.registry import get_sae_training_class

    sae_cls, cfg_cls = get_sae_training_class(f"aosae_{architecture}")
    cfg = cfg_cls(d_in=D_IN, d_sae=D_SAE, dtype="float64", adaptive_tau=False, tau_init=0.1, **extra)
    sae = sae_cls(cfg)
    _randomise(sae)
    sae.train()
    x = torch.randn(TOKENS, D_IN, dtype=torch.float64) * 2
    form = saelens.LATENT_FORMS[architecture]
    assert form != "dense" and sae.latent_form == form

    dense = _saelens_penalty_grads(sae, x, "dense")
    sparse = _saelens_penalty_grads(sae, x, form)
    _assert_same(sparse, dense, f"SAELens {architecture} ({form} form)")
    if architecture == "jumprelu":
        assert dense["threshold"].abs().sum() > 0
        support_only = _saelens_penalty_grads(sae, x, "support")
        assert not torch.allclose(support_only["threshold"], dense["threshold"]), \
            "the window made no difference: the test does not reach zeros near the threshold"
        if not extra.get("jumprelu_ste_to_input"):  # the STE reaches only θ: the other parameters agree
            torch.testing.assert_close(support_only["W_enc"], dense["W_enc"], rtol=1e-8, atol=1e-11)


def test_saelens_every_registered_architecture_is_wrapped(saelens):
    """One aosae_<arch> per training architecture of the installed SAELens, each with a sparse form."""
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

    plain = {a for a in SAE_TRAINING_CLASS_REGISTRY if not a.startswith("aosae_")}
    assert set(saelens.ARCHITECTURES) == plain
    assert {f"aosae_{a}" for a in plain} <= set(SAE_TRAINING_CLASS_REGISTRY)
    assert plain <= set(saelens.LATENT_FORMS), f"no latent form for {plain - set(saelens.LATENT_FORMS)}"
    assert {a for a, _ in SAELENS_CASES} == plain


@pytest.mark.parametrize("activation", ["TopK", "AbsTopK", "BatchTopK"])
def test_saelens_recording_activations_match_the_library(saelens, activation):
    """Each recording twin returns exactly SAELens's activation output, and what it records rebuilds
    that output: TopK / AbsTopK rows of k, BatchTopK ragged rows (different counts per token)."""
    from sae_lens.saes.abstopk_sae import AbsTopK
    from sae_lens.saes.batchtopk_sae import BatchTopK
    from sae_lens.saes.topk_sae import TopK

    x = torch.randn(12, 30)
    original = {"TopK": TopK(4), "AbsTopK": AbsTopK(4), "BatchTopK": BatchTopK(3.0)}[activation]
    recording = saelens._recording(original)
    assert type(recording) is not type(original) and isinstance(recording, type(original))
    out = recording(x)
    torch.testing.assert_close(out, original(x), rtol=0, atol=0)
    if activation == "BatchTopK":
        offsets, indices, values = recording.last_rows
        counts = offsets.diff()
        assert counts.sum() == (out != 0).sum() and len(set(counts.tolist())) > 1
    else:
        indices, values = recording.last_topk
        counts = torch.full((12,), 4)
        indices, values = indices.reshape(-1), values.reshape(-1)
    rows = torch.repeat_interleave(torch.arange(12), counts)
    rebuilt = torch.zeros_like(out).index_put((rows, indices), values)
    torch.testing.assert_close(rebuilt, out, rtol=0, atol=0)


# ----------------------------------------------------------------------------- dictionary_learning

DICTLEARN_CASES = [
    ("StandardTrainer", {"l1_penalty": 0.04, "sparsity_warmup_steps": 1}),
    ("StandardTrainerAprilUpdate", {"l1_penalty": 0.04, "sparsity_warmup_steps": 1}),
    ("PAnnealTrainer", {"sparsity_warmup_steps": 1}),
    ("GatedSAETrainer", {"l1_penalty": 0.04, "sparsity_warmup_steps": 1}),
    ("GatedAnnealTrainer", {"sparsity_warmup_steps": 1}),
    ("TopKTrainer", {"k": 6, "threshold_start_step": 100}),
    ("BatchTopKTrainer", {"k": 6, "threshold_start_step": 100}),
    ("MatryoshkaBatchTopKTrainer", {"k": 6, "threshold_start_step": 100, "group_fractions": [0.25, 0.75]}),
    ("JumpReluTrainer", {"bandwidth": 0.5, "sparsity_warmup_steps": 1}),
]


def _dictlearn_penalty_grads(trainer, x: torch.Tensor, form: str) -> dict:
    trainer.latent_form = form
    named = [(n, p) for n, p in trainer.ae.named_parameters() if p.requires_grad]
    grads = []
    for coefficient in (1.0, 0.0):
        trainer.orthogonality_coefficient = coefficient
        loss = trainer.loss(x, step=1)
        grads.append({n: g if g is not None else torch.zeros_like(p) for (n, p), g in
                      zip(named, torch.autograd.grad(loss, [p for _, p in named], allow_unused=True))})
    return _difference(*grads)


@pytest.mark.parametrize("trainer_name, extra", DICTLEARN_CASES, ids=[n for n, _ in DICTLEARN_CASES])
def test_dictlearn_support_gradient_equals_dense(dictlearn, trainer_name, extra):
    cls = getattr(dictlearn, f"Aosae{trainer_name}")
    trainer = cls(steps=10, activation_dim=D_IN, dict_size=D_SAE, layer=0, lm_name="toy", device="cpu", seed=0,
                  warmup_steps=1, adaptive_tau=False, tau_init=0.1, **extra)
    trainer.ae.to(torch.float64)
    _randomise(trainer.ae)
    x = torch.randn(TOKENS, D_IN, dtype=torch.float64) * 2
    form = trainer.latent_form
    assert form != "dense" and trainer._latent_form() == form

    dense = _dictlearn_penalty_grads(trainer, x, "dense")
    sparse = _dictlearn_penalty_grads(trainer, x, form)
    _assert_same(sparse, dense, f"dictionary_learning {trainer_name} ({form} form)")
    if trainer_name == "JumpReluTrainer":
        assert dense["threshold"].abs().sum() > 0
        support_only = _dictlearn_penalty_grads(trainer, x, "support")
        assert not torch.allclose(support_only["threshold"], dense["threshold"])


def test_dictlearn_every_listed_trainer_is_wrapped(dictlearn):
    names = {t.__name__ for t in dictlearn.TRAINERS}
    assert names == {n for n, _ in DICTLEARN_CASES}
    assert all(hasattr(dictlearn, f"Aosae{n}") for n in names)


def test_dictlearn_other_dictionary_class_gets_the_dense_path(dictlearn):
    """A trainer given a dictionary it was not written for: its activation's backward is unknown."""
    from dictionary_learning.dictionary import AutoEncoder

    class Custom(AutoEncoder):
        pass

    trainer = dictlearn.AosaeStandardTrainer(steps=10, activation_dim=8, dict_size=16, layer=0, lm_name="toy",
                                             device="cpu", warmup_steps=1, sparsity_warmup_steps=1, dict_class=Custom)
    assert trainer.latent_form == "support" and trainer._latent_form() == "dense"


# ----------------------------------------------------------------------------- architectures the tables do not list


def test_saelens_wrapper_takes_an_architecture_registered_later(saelens, monkeypatch):
    """add_orthogonality wraps any registered SAELens training architecture; one without a
    LATENT_FORMS entry gets the dense path (exact for any activation), and unknown names raise."""
    from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.standard_sae import StandardSAEConfig, StandardTrainingSAE, StandardTrainingSAEConfig

    class SoftplusSAE(StandardTrainingSAE):  # an activation whose gradient is not zero off any support
        def get_activation_fn(self):
            return torch.nn.Softplus()

    class SoftplusConfig(StandardTrainingSAEConfig):
        @classmethod
        def architecture(cls) -> str:
            return "softplus_test"

        def get_inference_config_class(self) -> type:  # no inference class of its own
            return StandardSAEConfig

    monkeypatch.setitem(SAE_TRAINING_CLASS_REGISTRY, "softplus_test", (SoftplusSAE, SoftplusConfig))
    try:
        sae_cls, cfg_cls = saelens.add_orthogonality("softplus_test")
        assert saelens.add_orthogonality("softplus_test") == (sae_cls, cfg_cls)  # idempotent
        sae = sae_cls(cfg_cls(d_in=8, d_sae=24, l1_coefficient=1e-3))
        assert sae.latent_form == "dense" and sae.cfg.architecture() == "aosae_softplus_test"
        out = sae.training_forward_pass(TrainStepInput(
            sae_in=torch.randn(16, 8), coefficients={"l1": 1e-3, saelens.ORTHOGONALITY: 1.0},
            dead_neuron_mask=None, n_training_steps=0, is_logging_step=False))
        assert out.losses["orthogonality_loss"] > 0
    finally:
        SAE_TRAINING_CLASS_REGISTRY.pop("aosae_softplus_test", None)
        SAE_CLASS_REGISTRY.pop("aosae_softplus_test", None)
        for name in ("AosaeSoftplusSAETrainingSAE", "AosaeSoftplusSAETrainingSAEConfig"):
            assert vars(saelens).pop(name, None) is not None, name
    with pytest.raises(ValueError, match="no training architecture 'no_such_arch'"):
        saelens.add_orthogonality("no_such_arch")


def test_dictlearn_wrapper_takes_another_trainer(dictlearn):
    """add_orthogonality on a trainer the table does not list: the dense path."""
    from dictionary_learning.trainers.standard import StandardTrainer

    class MyTrainer(StandardTrainer):
        pass

    cls = dictlearn.add_orthogonality(MyTrainer)
    trainer = cls(steps=10, activation_dim=8, dict_size=24, layer=0, lm_name="toy", device="cpu", warmup_steps=1,
                  sparsity_warmup_steps=1)
    assert type(trainer).__name__ == "AosaeMyTrainer" and trainer._latent_form() == "dense"
    loss = trainer.loss(torch.randn(16, 8), step=1)
    assert torch.isfinite(loss) and trainer.orthogonality_penalty > 0
