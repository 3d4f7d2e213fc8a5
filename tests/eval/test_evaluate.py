"""aosae.evaluate on a tiny random Llama with tiny SAEs: identity-like SAE ⇒ scores ≈ 1."""
import math

import pytest
import torch

from aosae.eval import evaluate as E
from saes import identity_sae

transformers = pytest.importorskip("transformers")


def _tiny_model(d=16, layers=2, vocab=97):
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=2 * d,
                                   num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                                   max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger embeddings so that zero-ablating the residual visibly changes the logits
        model.model.embed_tokens.weight.mul_(50.0)
    return model



@pytest.mark.parametrize("layer", [0, 1])
def test_identity_sae_scores_one(seed, layer):
    model = _tiny_model()
    sae = identity_sae(16)
    toks = torch.randint(0, 97, (6, 12))
    res = E.evaluate_sae(sae, model, E.token_batches_from_ids(toks, 4), hook_layer=layer)
    assert res["kl_div_with_ablation"] > 1e-3
    assert res["kl_div_score"] == pytest.approx(1.0, abs=1e-3)
    assert res["ce_loss_score"] == pytest.approx(1.0, abs=1e-2)
    assert res["cossim"] == pytest.approx(1.0, abs=1e-5)
    assert res["explained_variance"] == pytest.approx(1.0, abs=1e-5)
    assert res["n_tokens"] == 6 * 11  # first position skipped
    assert res["decoder_cos_max"] == pytest.approx(1.0, abs=1e-5)  # rows i and d+i are antiparallel


def test_random_sae_scores_below_one(seed):
    from aosae.nn.sae import SparseAutoencoder

    model = _tiny_model()
    sae = SparseAutoencoder.from_dims(16, 8)  # too narrow to reconstruct
    toks = torch.randint(0, 97, (4, 12))
    res = E.evaluate_sae(sae, model, [toks], hook_layer=1)
    assert res["kl_div_score"] < 0.99
    assert res["explained_variance"] < 0.99
    for k in ("kl_div_score", "ce_loss_score", "cossim", "l0", "mse", "all_abs_c_mean", "topk_abs_c_mean"):
        assert math.isfinite(res[k]), k
    assert 0 <= res["dead_fraction"] <= 1 and 0 <= res["dense_fraction"] <= 1


def test_replace_residual_restores_model(seed):
    model = _tiny_model()
    toks = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        before = model(input_ids=toks).logits
        with E.replace_residual(model, 0, torch.zeros_like):
            ablated = model(input_ids=toks).logits
        after = model(input_ids=toks).logits
    torch.testing.assert_close(before, after)
    assert not torch.allclose(before, ablated)
    with pytest.raises(ValueError, match="out of range"):
        with E.replace_residual(model, 5, torch.zeros_like):
            pass


def test_write_eval_and_table(tmp_path):
    res = {"cossim": 0.9, "l0": 12.0, "kl_div_score": float("nan")}
    path = E.write_eval(tmp_path, res)
    text = path.read_text()
    assert '"cossim": 0.9' in text and "null" in text  # NaN written as null (valid JSON)
    table = E.format_table(res)
    assert "cossim" in table and "l0" in table
