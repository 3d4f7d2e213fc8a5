"""SCR and TPP (SAEBench's definitions): each step against a float64 reference, the score
formulas on hand-made accuracies, a planted spurious correlation, and the suite end to end."""
import math

import pytest
import torch

from aosae.eval import probing as PR
from aosae.eval import scr_tpp as S
from aosae.eval import tasks as T
from aosae.eval.text_activations import TextActivations
from aosae.nn.sae import SparseAutoencoder
from saes import identity_sae
from tiny_lm import tiny_task_set

pytest.importorskip("sklearn", reason="the probing suite needs scikit-learn (aosae[eval])")


def _sae(d, d_sae, gen):
    sae = SparseAutoencoder.from_dims(d, d_sae)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=gen))
        sae.b_dec.copy_(0.1 * torch.randn(d, generator=gen))
    return sae.eval()


def test_ablation_keeps_the_error_and_matches_the_per_token_route(seed):
    """Pooled x − Σ_S f_i W_dec[i] equals the per-token SAE.decode(f with S zeroed) + error, pooled;
    with SAEBench's zero-padded positions added, it equals its padded layout."""
    gen = torch.Generator().manual_seed(seed)
    d, d_sae, context = 6, 40, 9
    sae = _sae(d, d_sae, gen).double()
    lengths = torch.randint(1, context, (5,), generator=gen)
    acts = TextActivations(torch.randn(int(lengths.sum()), d, generator=gen, dtype=torch.float64),
                           torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]))
    latents = torch.randperm(d_sae, generator=gen)[:7]
    with torch.no_grad():
        f = sae.encode(acts.rows)
        err = acts.rows - sae.decode(f)
        f_abl = f.clone()
        f_abl[:, latents] = 0
        per_token = sae.decode(f_abl) + err
        ours = S.ablate_pooled(acts.pooled().double(), acts.sae_pooled(sae).double(), sae.W_dec, latents)
        torch.testing.assert_close(ours, acts.__class__(per_token, acts.offsets).pooled().double(), rtol=1e-9, atol=1e-9)
        # SAEBench's layout: every text padded to `context` rows of zeros, summed, divided by the kept count
        padded = torch.zeros(5, context, d, dtype=torch.float64)
        for i in range(5):
            padded[i, : lengths[i]] = acts.rows[acts.offsets[i] : acts.offsets[i + 1]]
        fp = sae.encode(padded)
        fp_abl = fp.clone()
        fp_abl[..., latents] = 0
        ref = (sae.decode(fp_abl) + padded - sae.decode(fp)).sum(1) / lengths.unsqueeze(1).double()
        kept = lengths.double()
        f0 = sae.encode(torch.zeros(1, d, dtype=torch.float64))[0]
        ours = S.ablate_pooled(acts.pooled().double(), acts.sae_pooled(sae).double(), sae.W_dec, latents,
                               padded=(context - kept) / kept, f_zero=f0)
        torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)


def test_node_effects_match_float64_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    acts = {k: torch.rand(8, 30, generator=gen, dtype=torch.float64) for k in ("a", "b", "c")}
    W_dec = torch.randn(30, 5, generator=gen, dtype=torch.float64)
    probe = torch.nn.Linear(5, 1, dtype=torch.float64)
    w = probe.weight[0].detach()
    # SCR: paired groups, |Δmean · (W_dec w)|
    scr_acts = {k: acts[k2] for k, k2 in zip(("spurious", "spurious_neg"), ("a", "b"))}
    eff = S.node_effects(scr_acts, probe, W_dec, "spurious", scr=True)
    ref = ((acts["a"].mean(0) - acts["b"].mean(0)) * (W_dec @ w)).abs()
    torch.testing.assert_close(eff.double(), ref, rtol=1e-5, atol=1e-7)
    # TPP: one vs the rest (8 negatives drawn from b and c), only latents more active on the class
    torch.manual_seed(seed)
    eff = S.node_effects(acts, probe, W_dec, "a", scr=False)
    torch.manual_seed(seed)
    from aosae.eval.sparse_probing import one_vs_rest

    x, y = one_vs_rest(acts, "a")
    diff = (x[y == 1].mean(0) - x[y == 0].mean(0)).clamp(min=0)
    torch.testing.assert_close(eff.double(), diff * (W_dec @ w), rtol=1e-5, atol=1e-7)


def test_top_latents_only_non_zero_effects():
    eff = torch.tensor([0.0, 3.0, 0.0, 1.0, 2.0])
    assert sorted(S.top_latents(eff, 2).tolist()) == [1, 4]
    assert sorted(S.top_latents(eff, 5).tolist()) == [1, 3, 4]
    assert S.top_latents(torch.zeros(4), 2).numel() == 0
    with pytest.raises(ValueError, match="cannot ablate"):
        S.top_latents(eff, 6)


def test_scr_score_formula_and_direction():
    clean = {"spurious": 0.95, "target": 0.9, "biased": 0.99,
             "biased probe on target data": 0.6, "biased probe on spurious data": 0.8,
             "spurious probe on target data": 0.5, "target probe on spurious data": 0.5,
             "spurious probe on biased data": 0.9, "target probe on biased data": 0.9}
    ablated = {"spurious": {2: {"biased probe on target data": 0.75}, 5: {"biased probe on target data": 0.9}},
               "target": {2: {"biased probe on spurious data": 0.8}, 5: {"biased probe on spurious data": 0.85}}}
    res = S.scr_scores(ablated, clean)
    assert res["scr_dir1_threshold_2"] == pytest.approx(0.15 / 0.3)
    assert res["scr_dir1_threshold_5"] == pytest.approx(1.0)
    assert res["scr_dir2_threshold_5"] == pytest.approx(0.05 / 0.15)
    # the biased probe is worse on the target (0.6 < 0.8): it leans on the spurious attribute, dir1 counts
    assert res["scr_metric_threshold_2"] == res["scr_dir1_threshold_2"]
    # no gap between the target probe and the biased probe: score 0; a tie in direction: no metric
    tied = dict(clean, **{"biased probe on spurious data": 0.6, "target": 0.6005})
    res = S.scr_scores(ablated, tied)
    assert res["scr_dir1_threshold_2"] == 0.0 and "scr_metric_threshold_2" not in res
    avg = S.average([{"x": 1.0, "y": 2.0}, {"x": 3.0}])
    assert avg == {"x": 2.0, "y": 2.0}


def test_tpp_score_formula():
    clean = {"a": 0.9, "b": 0.8, "c": 0.7}
    ablated = {"a": {2: {"a": 0.6, "b": 0.8, "c": 0.6}}, "b": {2: {"a": 0.9, "b": 0.8, "c": 0.7}},
               "c": {2: {"a": 0.85, "b": 0.75, "c": 0.5}}}
    mean, per_class = S.tpp_scores(ablated, clean)
    assert per_class["a"]["tpp_threshold_2_intended_diff_only"] == pytest.approx(0.3)
    assert per_class["a"]["tpp_threshold_2_unintended_diff_only"] == pytest.approx(0.05)
    assert per_class["a"]["tpp_threshold_2_total_metric"] == pytest.approx(0.25)
    assert per_class["b"]["tpp_threshold_2_total_metric"] == pytest.approx(0.0)
    assert per_class["c"]["tpp_threshold_2_total_metric"] == pytest.approx(0.2 - 0.05)
    assert mean["tpp_threshold_2_total_metric"] == pytest.approx((0.25 + 0.0 + 0.15) / 3)



def _one_token_texts(x):
    return TextActivations(x, torch.arange(x.shape[0] + 1))


def test_planted_spurious_attribute_is_removed(seed):
    """Target on axis 0, spurious attribute on axis 1, an SAE with one latent per signed axis, and
    probes set by hand: the biased probe reads 0.5·axis 0 + 3·axis 1, so on target data it is near
    chance. Ablating the spurious probe's top-2 latents (axis 1's) leaves it reading axis 0 only: SCR
    dir1 ≈ 1; ablating the target probe's latents leaves it reading axis 1: dir2 ≈ 1 as well."""
    gen = torch.Generator().manual_seed(seed)
    d = 8

    def texts(t, s, n):
        x = 0.3 * torch.randn(n, d, generator=gen)
        x[:, 0] += t
        x[:, 1] += s
        return x

    q = {(t, s): texts(t, s, 50) for t in (1, -1) for s in (1, -1)}
    groups = {"spurious": torch.cat([q[1, 1], q[-1, 1]]), "spurious_neg": torch.cat([q[1, -1], q[-1, -1]]),
              "target": torch.cat([q[1, 1], q[1, -1]]), "target_neg": torch.cat([q[-1, 1], q[-1, -1]]),
              "biased": texts(1, 1, 100), "biased_neg": texts(-1, -1, 100)}

    def probe(w0, w1):
        lin = torch.nn.Linear(d, 1)
        with torch.no_grad():
            lin.weight.zero_()
            lin.weight[0, 0], lin.weight[0, 1] = w0, w1
            lin.bias.zero_()
        return lin

    probes = {"spurious": probe(0.0, 1.0), "target": probe(1.0, 0.0), "biased": probe(0.5, 3.0)}
    torch.manual_seed(seed)
    clean = S.test_accuracies(probes, S.SCR_CLASSES, groups, scr=True)
    assert clean["target"] > 0.95 and clean["biased probe on target data"] < 0.7, clean
    lm = S.LMProbes(probes, clean, S.SCR_CLASSES, True, PR.P.rng_state())
    sae = identity_sae(d)
    with torch.no_grad():
        pooled = {k: _one_token_texts(v).sae_pooled(sae) for k, v in groups.items()}
        side = S.SaeSide(train=pooled, test=pooled, W_dec=sae.W_dec)
        res = S.scr_for_pair(lm, groups, side, thresholds=(2, 5))
    assert res["scr_dir1_threshold_2"] > 0.9, res
    assert res["scr_metric_threshold_2"] == res["scr_dir1_threshold_2"]  # the biased probe leans on axis 1
    # TPP on the same probes: ablating "target"'s latents hits the target probe, not the spurious one
    tpp_probes = {"target": probes["target"], "spurious": probes["spurious"]}
    tpp_groups = {"target": groups["target"], "spurious": groups["spurious"]}
    torch.manual_seed(seed)
    tpp_clean = S.test_accuracies(tpp_probes, ("target", "spurious"), tpp_groups, scr=False)
    tpp_lm = S.LMProbes(tpp_probes, tpp_clean, ("target", "spurious"), False, PR.P.rng_state())
    tpp_side = S.SaeSide(train={k: pooled[k] for k in tpp_groups}, test={k: pooled[k] for k in tpp_groups},
                         W_dec=sae.W_dec)
    mean, per_class = S.tpp_for_dataset(tpp_lm, tpp_groups, tpp_side, thresholds=(1,))
    assert per_class["target"]["tpp_threshold_1_intended_diff_only"] > 0.2
    assert abs(per_class["target"]["tpp_threshold_1_unintended_diff_only"]) < 0.1


def _tiny_suite(tmp_path, seeds):
    transformers = pytest.importorskip("transformers")
    from tiny_lm import make_tiny_lm
    from aosae.eval.text_activations import cached_activations

    path = make_tiny_lm(tmp_path / "lm")
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    ts = tiny_task_set()

    acts, _ = cached_activations(model, tok, ts.texts, 1, model_name=str(path), texts_digest=ts.digest(), context=16,
                                 cache_dir=tmp_path / "cache")
    return PR.ProbingSuite(ts, acts, 16, seeds, k_values=(1, 2), thresholds=(2, 5))


def test_suite_end_to_end_on_a_tiny_lm(tmp_path, seed):
    suite = _tiny_suite(tmp_path, seeds=(1, 2))
    sae = _sae(32, 48, torch.Generator().manual_seed(seed))
    res, details = suite.evaluate(sae, probing=True, scr=True)
    assert res["probing_task_set"] == "tiny" and res["probing_seeds"] == [1, 2]
    for k in ("llm_test_accuracy", "sae_test_accuracy", "sae_top_1_test_accuracy", "llm_top_2_test_accuracy"):
        assert 0.0 <= res[k] <= 1.0 and res[f"{k}_ci95"] >= 0.0
    assert res["sae_llm_accuracy_ratio"] == pytest.approx(res["sae_test_accuracy"] / res["llm_test_accuracy"], rel=0.2)
    for n in (2, 5):
        assert math.isfinite(res[f"scr_dir1_threshold_{n}"]) and math.isfinite(res[f"tpp_threshold_{n}_total_metric"])
    assert set(details["sparse_probing"]) == {1, 2} and set(details["scr_tpp"][1]["scr"]) == {"xy"}
    # the LM side is computed once per seed: a second SAE reuses it, and the same SAE gives the same numbers
    again, _ = suite.evaluate(sae, probing=True, scr=True)
    assert again == res
    with pytest.raises(ValueError, match="exceeds"):
        PR.ProbingSuite(suite.tasks, suite.acts, 16, (1,), thresholds=(500,)).evaluate(sae)


def test_t_interval():
    assert PR.t_interval([1.0]) == 0.0
    assert PR.t_interval([1.0, 3.0]) == pytest.approx(12.7062 * math.sqrt(2) / math.sqrt(2), rel=1e-4)
    out = PR.summarise([{"a": 1.0, "b": 2.0}, {"a": 3.0}])
    assert out["a"] == 2.0 and out["b"] == 2.0 and out["b_ci95"] == 0.0


def test_run_eval_writes_probing_results(tmp_path, monkeypatch, seed):
    """`aosae eval RUN --probing --scr`'s logic on a saved SAE of a tiny LM: eval.json and probing.json."""
    import json

    pytest.importorskip("transformers")
    from tiny_lm import make_tiny_lm
    from aosae.eval.evaluate import run_eval

    monkeypatch.setenv("AOSAE_CACHE", str(tmp_path / "cache"))
    path = make_tiny_lm(tmp_path / "lm")
    run = tmp_path / "run"
    _sae(32, 48, torch.Generator().manual_seed(seed)).save(run)
    (run / "train_config.json").write_text(json.dumps({"model": str(path), "layer": 1, "context_size": 16}))
    res = run_eval(run, n_tokens=30, probing=True, scr=True, probing_tasks=tiny_task_set(), probing_seeds=(3,),
                   log=lambda m: None)
    saved = json.loads((run / "eval.json").read_text())
    assert saved["probing_task_set"] == "tiny" and saved["probing_seeds"] == [3]
    assert saved["sae_test_accuracy"] == res["sae_test_accuracy"] and "scr_dir1_threshold_20" in saved
    assert "tpp_threshold_500_total_metric" not in saved  # 48 latents: thresholds above d_sae are left out
    details = json.loads((run / "probing.json").read_text())
    assert set(details["sparse_probing"]) == {"3"}
