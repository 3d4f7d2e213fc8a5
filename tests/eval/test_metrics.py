"""aosae.metrics against hand-computed values on tiny tensors and against direct formulas."""
import math

import pytest
import torch

from aosae.eval import metrics as M


def test_reconstruction_metrics_hand_computed():
    # two tokens, two dims (the example of SAELens PR #665's review):
    # mu = [1, 2]; total SS = 5 + 5 = 10; residual SS = 1 + 1 = 2  -> EV = 0.8
    x = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
    x_hat = torch.tensor([[2.0, 1.0], [0.0, 3.0]])
    assert M.explained_variance(x, x_hat) == pytest.approx(0.8)
    # legacy: per token 1 - 1/5 each -> 0.8 here as well (equal per-token totals)
    assert M.explained_variance_legacy(x, x_hat) == pytest.approx(0.8)
    assert M.mse(x, x_hat) == pytest.approx(2 / 4)
    cos0 = 4 / (2 * math.sqrt(5))
    cos1 = 12 / (4 * 3)
    assert M.cossim(x, x_hat) == pytest.approx((cos0 + cos1) / 2)


def test_explained_variance_corrected_differs_from_legacy():
    # unequal per-token variance: corrected pools sums, legacy averages ratios
    x = torch.tensor([[0.0], [1.0], [5.0]])  # mean 2, squared deviations 4, 1, 9 (total 14)
    x_hat = torch.tensor([[1.0], [1.0], [5.0]])  # residuals 1, 0, 0
    assert M.explained_variance(x, x_hat) == pytest.approx(1 - 1 / 14)
    assert M.explained_variance_legacy(x, x_hat) == pytest.approx((1 - 1 / 4 + 1 + 1) / 3)


def test_mean_prediction_explains_nothing(seed):
    x = torch.randn(200, 7) + 3.0
    assert M.explained_variance(x, x.mean(0).expand_as(x)) == pytest.approx(0.0, abs=1e-9)
    assert M.explained_variance(x, x) == pytest.approx(1.0)


def test_l0_l1_density():
    f = torch.tensor([[0.0, 1.0, 2.0, 0.0], [0.0, 0.0, -3.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    assert M.l0(f) == pytest.approx(4 / 3)
    assert M.l1(f) == pytest.approx(7 / 3)
    d = M.latent_density(f)
    torch.testing.assert_close(d, torch.tensor([0.0, 1 / 3, 1.0, 0.0], dtype=torch.float64))
    assert M.dead_fraction(d) == pytest.approx(0.5)
    assert M.dense_fraction(d) == pytest.approx(0.5)  # 1/3 and 1.0 are > 10%


def test_streaming_stats_equal_one_shot(seed):
    x = torch.randn(300, 9) * torch.linspace(0.5, 3, 9) + 1.0
    x_hat = x + 0.3 * torch.randn_like(x)
    f = torch.relu(torch.randn(300, 20) - 1.0)
    st = M.ReconstructionStats()
    for s in (0, 70, 200):
        e = {0: 70, 70: 200, 200: 300}[s]
        st.update(x[s:e], x_hat[s:e], f[s:e])
    r = st.result()
    assert r["explained_variance"] == pytest.approx(M.explained_variance(x, x_hat), rel=1e-9)
    assert r["cossim"] == pytest.approx(M.cossim(x, x_hat), rel=1e-9)
    assert r["mse"] == pytest.approx(M.mse(x, x_hat), rel=1e-9)
    assert r["l0"] == pytest.approx(M.l0(f))
    assert r["dead_fraction"] == pytest.approx(M.dead_fraction(M.latent_density(f)))


def test_kl_and_scores():
    p = torch.tensor([[0.0, 0.0]])
    q = torch.tensor([[0.0, math.log(3.0)]])  # probs (1/2,1/2) vs (1/4,3/4)
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert float(M.kl_div_per_token(p, q)) == pytest.approx(expected, rel=1e-6)
    assert float(M.kl_div_per_token(q, q)) == pytest.approx(0.0, abs=1e-7)
    assert M.kl_score(2.0, 0.5) == pytest.approx(0.75)
    assert M.ce_loss_score(ce_zero_ablation=10.0, ce_sae=4.0, ce_clean=2.0) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="zero ablation"):
        M.kl_score(0.0, 0.1)
    with pytest.raises(ValueError, match="undefined"):
        M.ce_loss_score(3.0, 3.0, 3.0)


def test_decoder_cosine_stats_hand_computed():
    W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # cosines: 0, 1/√2, 1/√2
    s = M.decoder_cosine_stats(W, chunk=2)
    c = 1 / math.sqrt(2)
    assert s["decoder_cos_max"] == pytest.approx(c, rel=1e-6)
    assert s["decoder_cos_mean"] == pytest.approx(2 * c / 3, rel=1e-6)
    assert s["decoder_cos_max_mean"] == pytest.approx(c, rel=1e-6)


@pytest.mark.parametrize("n,chunk", [(2, 1), (37, 8), (130, 1024)])
def test_decoder_cosine_stats_against_dense(seed, n, chunk):
    W = torch.randn(n, 11, dtype=torch.float64)
    u = W / W.norm(dim=1, keepdim=True)
    C = (u @ u.t()).abs()
    iu = torch.triu_indices(n, n, 1)
    s = M.decoder_cosine_stats(W, chunk=chunk)
    assert s["decoder_cos_max"] == pytest.approx(float(C[iu[0], iu[1]].max()), rel=1e-5)
    assert s["decoder_cos_mean"] == pytest.approx(float(C[iu[0], iu[1]].mean()), rel=1e-5)
    C.fill_diagonal_(0)
    assert s["decoder_cos_max_mean"] == pytest.approx(float(C.max(1).values.mean()), rel=1e-5)


def test_coactivation_stats_against_dense(seed):
    f = torch.relu(torch.randn(64, 50))
    C = (f.t() @ f).double().abs()
    iu = torch.triu_indices(50, 50, 1)
    vals = C[iu[0], iu[1]]
    s = M.coactivation_stats(f, fraction=0.01, chunk=16)
    k = math.ceil(0.01 * 50 * 49 / 2)
    assert s["k"] == k
    assert s["all_abs_c_mean"] == pytest.approx(float(vals.mean()), rel=1e-5)
    assert s["topk_abs_c_mean"] == pytest.approx(float(vals.topk(k).values.mean()), rel=1e-5)


def test_shape_errors():
    with pytest.raises(ValueError, match="same shape"):
        M.cossim(torch.zeros(3, 2), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="zero variance"):
        M.explained_variance(torch.ones(4, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="W_dec"):
        M.decoder_cosine_stats(torch.zeros(1, 4))


def test_duplicate_pairs_hand_built(seed):
    W = torch.nn.functional.normalize(torch.randn(6, 16), dim=1)
    W[1] = -0.99 * W[0] + 0.01 * W[2]  # |cos| > 0.9 with latent 0 (sign does not matter)
    W[3] = W[2]
    live = torch.tensor([True, True, True, False, True, True])
    full = M.duplicate_pairs(W)
    assert full["duplicate_pairs"] >= 2 and full["live_latents"] == 6
    only_live = M.duplicate_pairs(W, live=live)  # latent 3 is dead: its copy of 2 does not count
    want = sum(1 for i in range(6) for j in range(i + 1, 6) if live[i] and live[j]
               and abs(float(torch.nn.functional.cosine_similarity(W[i], W[j], dim=0))) > 0.9)
    assert only_live["duplicate_pairs"] == want and only_live["live_latents"] == 5
    with pytest.raises(ValueError, match="live must be"):
        M.duplicate_pairs(W, live=torch.ones(3, dtype=torch.bool))


def test_mcc_matches_saelens_reference(seed):
    """The project's MCC against SAELens's own mean_correlation_coefficient (Hungarian on |cos|)."""
    import sae_lens.synthetic as saelens
    from aosae.data.synthetic import dictionary_metrics

    truth = torch.nn.functional.normalize(torch.randn(20, 16), dim=1)
    learned = truth[torch.randperm(20)] + 0.08 * torch.randn(20, 16)  # positively aligned: cos and |cos| agree
    ours = dictionary_metrics(learned, truth)["mcc"]
    theirs = saelens.mean_correlation_coefficient(learned, truth)
    assert ours == pytest.approx(theirs, abs=1e-5)
