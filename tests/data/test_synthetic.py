"""aosae.synthetic: generator statistics and metrics against the truth."""
import math

import pytest
import torch

from aosae.data import synthetic as S


def _cfg(**kw):
    base = dict(d=32, n_features=64, firing_prob=0.05, n_parents=3, children_per_parent=2,
                parent_prob=0.1, child_prob=0.6)
    base.update(kw)
    return S.SyntheticConfig(**base)


def test_deterministic_and_shared_dictionary(seed):
    cfg = _cfg()
    a, b = S.generate(cfg, 500, seed=seed), S.generate(cfg, 500, seed=seed)
    assert torch.equal(a.x, b.x) and torch.equal(a.activations, b.activations)
    c = S.generate(cfg, 500, seed=seed + 1)
    assert not torch.equal(a.x, c.x)
    assert torch.equal(a.directions, c.directions)  # same features in train and held-out sets


def test_unit_directions_and_reconstruction(seed):
    cfg = _cfg(dictionary_seed=seed)
    data = S.generate(cfg, 300, seed=seed)
    torch.testing.assert_close(data.directions.norm(dim=1), torch.ones(64))
    torch.testing.assert_close(data.x, data.activations @ data.directions)
    ortho = S.generate(_cfg(orthogonal=True, n_features=32, n_parents=0), 10, seed=seed).directions
    torch.testing.assert_close(ortho @ ortho.t(), torch.eye(32), atol=1e-5, rtol=0)


def test_firing_rates(seed):
    cfg = _cfg(firing_prob=0.08, correlation=0.0)
    data = S.generate(cfg, 40000, seed=seed)
    fires = (data.activations > 0).double()
    h = cfg.n_hierarchy
    free = fires[:, h:].mean(0)
    # binomial std at p=0.08, n=40000 is 0.0014: 5 sigma
    assert float((free - 0.08).abs().max()) < 0.007
    parents = [p for p, _ in data.hierarchy]
    assert float((fires[:, parents].mean(0) - 0.1).abs().max()) < 0.01
    children = [c for _, cs in data.hierarchy for c in cs]
    assert float((fires[:, children].mean(0) - 0.1 * 0.6 / 2).abs().max()) < 0.008


def test_correlation_controls_co_firing(seed):
    def mean_corr(rho):
        cfg = _cfg(n_parents=0, firing_prob=0.1, correlation=rho, correlation_group=4)
        fires = (S.generate(cfg, 20000, seed=seed).activations > 0).double()
        c = torch.corrcoef(fires.t())
        same = [c[i, i + 1] for i in range(0, 64, 4)]  # pairs inside a group
        other = [c[i, i + 4] for i in range(0, 60, 4)]  # pairs across groups
        return float(torch.stack(same).mean()), float(torch.stack(other).mean())

    same0, _ = mean_corr(0.0)
    same6, other6 = mean_corr(0.6)
    assert abs(same0) < 0.03
    assert same6 > 0.2
    assert abs(other6) < 0.03


def test_hierarchy_constraint(seed):
    data = S.generate(_cfg(child_prob=0.9), 20000, seed=seed)
    fires = data.activations > 0
    assert data.hierarchy
    for parent, children in data.hierarchy:
        child_any = fires[:, children]
        assert not bool((child_any.any(1) & ~fires[:, parent]).any()), "a child fired without its parent"
        assert int(child_any.sum(1).max()) <= 1, "children are mutually exclusive"
        assert int(child_any.any(1).sum()) > 0


@pytest.mark.parametrize("magnitude", ["constant", "uniform", "exponential", "lognormal"])
def test_magnitude_mean(seed, magnitude):
    cfg = _cfg(n_parents=0, firing_prob=0.5, magnitude=magnitude, magnitude_mean=2.0, magnitude_spread=0.5)
    acts = S.generate(cfg, 4000, seed=seed).activations
    vals = acts[acts > 0]
    assert float(vals.mean()) == pytest.approx(2.0, rel=0.05)
    assert float(vals.min()) >= 0


def test_sparse_output(seed):
    data = S.generate(_cfg(), 200, seed=seed, sparse=True)
    assert data.activations.is_sparse
    torch.testing.assert_close(data.x, data.activations.to_dense() @ data.directions)


def test_dictionary_metrics_perfect_and_random(seed):
    data = S.generate(_cfg(dictionary_seed=seed), 10, seed=seed)
    perm = torch.randperm(64)
    perfect = data.directions[perm] * 3.0  # row scale and order must not matter
    m = S.dictionary_metrics(perfect, data.directions)
    assert m["mmcs"] == pytest.approx(1.0) and m["mcc"] == pytest.approx(1.0) and m["frac_recovered"] == 1.0
    r = S.dictionary_metrics(torch.randn(64, 32), data.directions)
    assert r["mmcs"] < 0.7 and r["mcc"] < 0.6 and r["frac_recovered"] == 0.0
    matched = S.match_features(perfect, data.directions)
    assert torch.equal(perm[matched], torch.arange(64))


def test_greedy_matching_fallback(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_scipy(name, *args, **kwargs):
        if name.startswith("scipy"):
            raise ImportError("scipy hidden for this test")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_scipy)
    score = torch.tensor([[0.9, 0.8], [0.85, 0.1]], dtype=torch.float64)
    rows, cols = S._assignment(score)
    # greedy takes (0,0)=0.9 first, then (1,1)
    assert sorted(zip(rows.tolist(), cols.tolist())) == [(0, 0), (1, 1)]


class _ToySAE:
    """encode = ReLU(x @ W_enc) with a given decoder: enough for evaluate_against_truth."""

    def __init__(self, W_dec, W_enc, b_enc):
        self.W_dec, self.W_enc, self.b_enc = W_dec, W_enc, b_enc

    def encode(self, x):
        return torch.relu(x @ self.W_enc + self.b_enc)


def test_absorption_rate_detects_absorbing_child(seed):
    cfg = _cfg(orthogonal=True, n_features=16, d=32, n_parents=1, children_per_parent=2,
               parent_prob=0.3, child_prob=1.0, firing_prob=0.05, magnitude="constant")
    data = S.generate(cfg, 3000, seed=seed)
    D = data.directions
    # the ideal SAE: encoder = decoder transposed, threshold 0.5 -> no absorption
    good = _ToySAE(D, D.t(), torch.full((16,), -0.5))
    res = S.evaluate_against_truth(good, data)
    assert res["absorption_rate"] == 0.0 and res["parent_recall"] == 1.0
    # the absorbing SAE: parent latent inhibited by its children, child latents point at parent+child
    W_dec = D.clone()
    for c in (1, 2):
        W_dec[c] = (D[0] + D[c]) / math.sqrt(2)
    W_enc = D.t().clone()
    W_enc[:, 0] = D[0] - D[1] - D[2]
    bad = _ToySAE(W_dec, W_enc, torch.full((16,), -0.5))
    res = S.evaluate_against_truth(bad, data)
    assert res["absorption_rate"] == pytest.approx(1.0)
    assert res["parent_recall"] == pytest.approx(0.0)


def test_config_errors():
    with pytest.raises(ValueError, match="hierarchy needs"):
        S.SyntheticConfig(n_features=5, n_parents=2, children_per_parent=3)
    with pytest.raises(ValueError, match="firing_prob"):
        S.SyntheticConfig(firing_prob=1.5)
    with pytest.raises(ValueError, match="correlation"):
        S.SyntheticConfig(correlation=1.0)


def test_saelens_generator_as_ground_truth():
    """SAELens's own generator through generate_saelens: x = features·directions + bias, its hierarchy's
    children fire only with their parent and are mutually exclusive, same seed ⇒ same data."""
    cfg = S.SAELensSyntheticConfig(d=16, n_features=32, n_parents=2, children_per_parent=3)
    model = S.saelens_model(cfg)
    a = S.generate_saelens(cfg, 4000, seed=3, model=model)
    b = S.generate_saelens(cfg, 4000, seed=3, model=model)
    assert torch.equal(a.x, b.x) and a.x.shape == (4000, 16) and a.activations.shape == (4000, 32)
    bias = model.feature_dict.bias.detach()
    assert torch.allclose(a.activations @ model.feature_dict.feature_vectors.detach() + bias, a.x, atol=1e-4)
    assert torch.allclose(a.directions.norm(dim=1), torch.ones(32), atol=1e-5)
    assert len(a.hierarchy) == 2
    for parent, children in a.hierarchy:
        on = a.activations[:, children] > 0
        assert int(on.sum(1).max()) <= 1  # mutually exclusive
        assert not bool((on.any(1) & (a.activations[:, parent] <= 0)).any())  # never without the parent
        assert int(on.sum()) > 0
