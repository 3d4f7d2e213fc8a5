"""The adapters given wrong settings or bad activations: one clear ValueError/TypeError each,
raised by aosae's own checks (tests/ops/test_public_api_errors.py covers the op and the loss).

Here (and not in tests/ops) because importing dictionary_learning patches torch for the rest of
the process: conftest.py runs tests/integrations last."""
from __future__ import annotations


import pytest
import torch
from error_checks import check as check_error

def check(raises, match, call) -> None:
    check_error(raises, match, call, one_line=False)


def nan_batch(d_in: int = 16) -> torch.Tensor:
    x = torch.randn(32, d_in)
    x[3, 2] = float("nan")
    return x


def saelens_cases(saelens):
    standard = lambda **kw: saelens.AosaeStandardTrainingSAE(  # noqa: E731
        saelens.AosaeStandardTrainingSAEConfig(d_in=16, d_sae=64, l1_coefficient=1e-3, **kw))
    topk = saelens.AosaeTopKTrainingSAE(saelens.AosaeTopKTrainingSAEConfig(d_in=16, d_sae=64, k=4))

    def penalty(sae, acts):
        return lambda: sae.orthogonality_penalty(acts, acts)

    return {
        "similarity": (ValueError, "similarity", lambda: standard(ortho_similarity="pearson")),
        "fraction": (ValueError, "fraction", lambda: standard(ortho_fraction=2.0)),
        "negative coefficient": (ValueError, "orthogonality_coefficient", lambda: standard(orthogonality_coefficient=-1.0)),
        "tau bounds": (ValueError, "min <= init <= max", lambda: standard(tau_init=0.5)),
        "NaN latents (standard)": (ValueError, "NaN", penalty(standard(), torch.relu(nan_batch(64)))),
        "NaN input (topk)": (ValueError, "NaN", lambda: topk.orthogonality_penalty(*topk.encode_with_hidden_pre(nan_batch()))),
        # latents of another width than d_sae=64: named, never a broadcast error (or a silent wrong penalty)
        "narrow latents (standard)": (ValueError, r"d_sae=64.*\(32, 63\)", penalty(standard(), torch.rand(32, 63))),
        "wide latents (standard)": (ValueError, r"d_sae=64.*\(32, 65\)", penalty(standard(), torch.rand(32, 65))),
        "narrow latents (topk)": (ValueError, r"d_sae=64.*\(32, 63\)", penalty(topk, torch.rand(32, 63))),
        "meta latents": (ValueError, "meta tensor", penalty(standard(), torch.rand(32, 64, device="meta"))),
        "latents not a tensor": (TypeError, "torch.Tensor", penalty(standard(), [[0.0] * 64])),
        "1-D latents": (ValueError, r"feature_acts \[batch, d_sae=64\].*\(64,\).*feature_acts\[None\]",
                        penalty(standard(), torch.rand(64))),
        "pre-activations of another batch": (ValueError, r"hidden_pre of feature_acts' shape \(32, 64\), got \(16, 64\)",
                                             lambda: standard().orthogonality_penalty(torch.rand(32, 64), torch.rand(16, 64))),
        "bad backend": (ValueError, "ortho_backend 'bogus' is not a gram_topk backend: choose one of auto",
                        lambda: standard(ortho_backend="bogus")),
    }


def latent_penalty_cases():
    """aosae.integrations.latents.penalty, the one path both adapters hand their latents to."""
    from aosae.integrations.latents import penalty
    from aosae.nn.loss import TopKOrthoLoss

    loss = TopKOrthoLoss()
    return {
        "narrow latents": (ValueError, r"d_sae=64.*\(32, 48\)", lambda: penalty(loss, "support", 64, latents=torch.rand(32, 48))),
        "3-D latents of the wrong width": (ValueError, r"d_sae=64.*\(2, 16, 32\)",
                                           lambda: penalty(loss, "dense", 64, latents=torch.rand(2, 16, 32))),
        "sparse latents of the wrong width": (ValueError, "d_sae=64",
                                              lambda: penalty(loss, "support", 64, latents=torch.rand(8, 32).to_sparse())),
        "unknown form": (ValueError, "form must be one of", lambda: penalty(loss, "csr", 64, latents=torch.rand(8, 64))),
    }


@pytest.mark.parametrize("case", list(latent_penalty_cases()))
def test_latent_penalty_rejects(case):
    check(*latent_penalty_cases()[case])


def dictlearn_cases(dictlearn):
    common = dict(steps=10, activation_dim=16, dict_size=64, layer=0, lm_name="toy", device="cpu", seed=0, warmup_steps=1)
    standard = lambda **kw: dictlearn.AosaeStandardTrainer(l1_penalty=0.04, sparsity_warmup_steps=1, **common, **kw)  # noqa: E731
    topk = lambda **kw: dictlearn.AosaeTopKTrainer(k=4, threshold_start_step=100, **common, **kw)  # noqa: E731
    return {
        "negative coefficient": (ValueError, "orthogonality_coefficient", lambda: standard(orthogonality_coefficient=-1)),
        "fraction": (ValueError, "fraction", lambda: standard(ortho_fraction=0.0)),
        "similarity": (ValueError, "similarity", lambda: topk(ortho_similarity="pearson")),
        "NaN batch (standard)": (ValueError, "NaN", lambda: standard().loss(nan_batch(), step=1)),
        "NaN batch (topk)": (ValueError, "NaN", lambda: topk().loss(nan_batch(), step=1)),
        "batch of the wrong width": (ValueError, r"activation_dim=16.*\(8, 15\)", lambda: standard().loss(torch.rand(8, 15), step=1)),
        "3-D batch (topk)": (ValueError, r"activation_dim=16.*\(2, 8, 16\)", lambda: topk().loss(torch.rand(2, 8, 16), step=1)),
        "integer batch": (TypeError, "floating-point.*int64", lambda: standard().loss(torch.ones(8, 16, dtype=torch.long), step=1)),
        "meta batch": (ValueError, "on meta but the dictionary is on cpu", lambda: topk().loss(torch.rand(8, 16, device="meta"), step=1)),
        "add_orthogonality of an instance": (TypeError, "trainer class", lambda: dictlearn.add_orthogonality(5)),
        "bad backend": (ValueError, "ortho_backend 'tritn' is not a gram_topk backend: choose one of auto",
                        lambda: topk(ortho_backend="tritn")),
    }


SAELENS_CASES = ["similarity", "fraction", "negative coefficient", "tau bounds", "NaN latents (standard)",
                 "NaN input (topk)", "narrow latents (standard)", "wide latents (standard)", "narrow latents (topk)",
                 "meta latents", "latents not a tensor", "1-D latents", "pre-activations of another batch", "bad backend"]
DICTLEARN_CASES = ["negative coefficient", "fraction", "similarity", "NaN batch (standard)", "NaN batch (topk)",
                   "batch of the wrong width", "3-D batch (topk)", "integer batch", "meta batch",
                   "add_orthogonality of an instance", "bad backend"]


def test_from_saelens_names_a_non_sae(saelens):
    from aosae.integrations.saelens import from_saelens

    check(TypeError, "needs a SAELens SAE.*got Linear.*import_from_saelens", lambda: from_saelens(torch.nn.Linear(2, 2)))


@pytest.mark.parametrize("case", SAELENS_CASES)
def test_saelens_adapter_rejects(saelens, case):
    check(*saelens_cases(saelens)[case])


@pytest.mark.parametrize("case", DICTLEARN_CASES)
def test_dictionary_learning_adapter_rejects(dictlearn, case):
    check(*dictlearn_cases(dictlearn)[case])
