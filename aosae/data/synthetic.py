"""Synthetic activations with known ground-truth features, and metrics against the truth.

x = Σ_i a_i · d_i (+ noise), with d_i known unit directions in R^d and a_i ≥ 0 sparse
feature activations. Controls: number of features, firing probability, magnitude
distribution, pairwise correlation of firings (a Gaussian copula: features in the same
group share a latent Gaussian factor), and a hierarchy (parent features that always fire
when one of their children fires: the setting where feature absorption happens).

Everything is deterministic for a given seed (a private torch.Generator).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

MAGNITUDES = ("constant", "uniform", "exponential", "lognormal")


@dataclass
class SyntheticConfig:
    """Settings of the generator.

    d: ambient dimension of x.
    n_features: number of true features F (parents and children included).
    firing_prob: probability that a free (non-hierarchical) feature fires on a token.
    magnitude: "constant" (mean), "uniform" on [mean·(1−spread), mean·(1+spread)],
        "exponential" (mean), or "lognormal" (mean, relative std `spread`).
    magnitude_mean, magnitude_spread: see `magnitude`.
    correlation: in [0, 1): correlation of the latent Gaussians of features in the same
        group (size `correlation_group`); 0 makes firings independent.
    correlation_group: group size of correlated free features.
    n_parents, children_per_parent: the hierarchy; the first n_parents·(1+children) features
        are parents and their children. A parent fires with prob `parent_prob`; when it
        fires, one of its children fires with prob `child_prob` (children are mutually
        exclusive). A child never fires without its parent.
    orthogonal: orthonormal directions when n_features <= d (else random unit vectors).
    noise_std: std of isotropic Gaussian noise added to x.
    dictionary_seed: seed of the true directions, separate from the sampling seed so that
        a training set and a held-out set (different `seed` in generate) share features.
    """

    d: int = 64
    n_features: int = 128
    firing_prob: float = 0.02
    magnitude: Literal["constant", "uniform", "exponential", "lognormal"] = "uniform"
    magnitude_mean: float = 1.0
    magnitude_spread: float = 0.5
    correlation: float = 0.0
    correlation_group: int = 4
    n_parents: int = 4
    children_per_parent: int = 3
    parent_prob: float = 0.05
    child_prob: float = 0.6
    orthogonal: bool = False
    noise_std: float = 0.0
    dictionary_seed: int = 0

    def __post_init__(self):
        if self.d < 1 or self.n_features < 1:
            raise ValueError(f"need d >= 1 and n_features >= 1, got d={self.d}, n_features={self.n_features}")
        for name in ("firing_prob", "parent_prob", "child_prob"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
        if not 0.0 <= self.correlation < 1.0:
            raise ValueError(f"correlation must be in [0, 1), got {self.correlation}")
        if self.correlation_group < 1:
            raise ValueError(f"correlation_group must be >= 1, got {self.correlation_group}")
        if self.magnitude not in MAGNITUDES:
            raise ValueError(f"magnitude must be one of {MAGNITUDES}, got {self.magnitude!r}")
        if self.magnitude_mean <= 0 or self.magnitude_spread < 0:
            raise ValueError("magnitude_mean must be > 0 and magnitude_spread >= 0")
        if self.magnitude == "uniform" and self.magnitude_spread > 1:
            raise ValueError("uniform magnitudes need magnitude_spread <= 1 (activations stay >= 0)")
        if self.n_parents < 0 or self.children_per_parent < 0:
            raise ValueError("n_parents and children_per_parent must be >= 0")
        if self.n_hierarchy > self.n_features:
            raise ValueError(
                f"the hierarchy needs n_parents·(1+children_per_parent) = {self.n_hierarchy} features "
                f"but n_features = {self.n_features}; raise n_features or shrink the hierarchy"
            )
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")

    @property
    def n_hierarchy(self) -> int:
        return self.n_parents * (1 + self.children_per_parent) if self.children_per_parent else 0


@dataclass
class SyntheticData:
    """x [N, d] float32; directions [F, d] float32 unit rows; activations [N, F] float32
    (dense, or torch sparse COO when asked); hierarchy: list of (parent, [children])."""

    x: torch.Tensor
    directions: torch.Tensor
    activations: torch.Tensor
    hierarchy: list = field(default_factory=list)


def make_directions(cfg: SyntheticConfig) -> torch.Tensor:
    """[F, d] unit rows from cfg.dictionary_seed: orthonormal when asked and possible, else
    normalised Gaussians."""
    gen = torch.Generator().manual_seed(int(cfg.dictionary_seed))
    g = torch.randn(cfg.n_features, cfg.d, generator=gen, dtype=torch.float64)
    if cfg.orthogonal and cfg.n_features <= cfg.d:
        q, _ = torch.linalg.qr(g.t())  # [d, F] with orthonormal columns
        return q.t().contiguous().float()
    return (g / g.norm(dim=1, keepdim=True)).float()


def _magnitudes(cfg: SyntheticConfig, shape, gen: torch.Generator) -> torch.Tensor:
    m, s = cfg.magnitude_mean, cfg.magnitude_spread
    if cfg.magnitude == "constant":
        return torch.full(shape, m)
    if cfg.magnitude == "uniform":
        return m * (1 - s + 2 * s * torch.rand(shape, generator=gen))
    if cfg.magnitude == "exponential":
        return -m * torch.log1p(-torch.rand(shape, generator=gen))
    sigma2 = math.log1p(s * s)  # lognormal with mean m and relative std s
    return torch.exp(math.log(m) - sigma2 / 2 + math.sqrt(sigma2) * torch.randn(shape, generator=gen))


def _correlated_fires(n: int, k: int, p: float, rho: float, group: int, gen: torch.Generator) -> torch.Tensor:
    """[n, k] bool: each column fires with prob p; columns in a group share a Gaussian factor."""
    if k == 0:
        return torch.zeros(n, 0, dtype=torch.bool)
    if p <= 0.0:
        return torch.zeros(n, k, dtype=torch.bool)
    if p >= 1.0:
        return torch.ones(n, k, dtype=torch.bool)
    n_groups = math.ceil(k / group)
    shared = torch.randn(n, n_groups, generator=gen).repeat_interleave(group, dim=1)[:, :k]
    z = math.sqrt(rho) * shared + math.sqrt(1 - rho) * torch.randn(n, k, generator=gen)
    threshold = math.sqrt(2) * torch.erfinv(torch.tensor(1 - 2 * p)).item()  # Φ⁻¹(1 − p)
    return z > threshold


def generate(cfg: SyntheticConfig, n_samples: int, seed: int = 0, sparse: bool = False) -> SyntheticData:
    """Draws n_samples tokens. Same (cfg, n_samples, seed) ⇒ the same data, bit for bit;
    the directions depend only on cfg (dictionary_seed), so sets drawn with different
    seeds share the same features.

    Returns SyntheticData(x [N, d] float32, directions [F, d] float32,
    activations [N, F] float32 (sparse COO if `sparse`), hierarchy [(parent, [children])]).
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    directions = make_directions(cfg)
    gen = torch.Generator().manual_seed(int(seed))
    n, F, h = n_samples, cfg.n_features, cfg.n_hierarchy
    fires = torch.zeros(n, F, dtype=torch.bool)
    hierarchy = []
    c = cfg.children_per_parent
    for p in range(cfg.n_parents if c else 0):
        parent = p * (1 + c)
        children = list(range(parent + 1, parent + 1 + c))
        hierarchy.append((parent, children))
        parent_on = torch.rand(n, generator=gen) < cfg.parent_prob
        child_on = parent_on & (torch.rand(n, generator=gen) < cfg.child_prob)
        which = torch.randint(0, c, (n,), generator=gen)
        fires[:, parent] = parent_on
        for j, child in enumerate(children):
            fires[:, child] = child_on & (which == j)
    fires[:, h:] = _correlated_fires(n, F - h, cfg.firing_prob, cfg.correlation, cfg.correlation_group, gen)
    acts = fires.float() * _magnitudes(cfg, (n, F), gen)
    x = acts @ directions
    if cfg.noise_std > 0:
        x = x + cfg.noise_std * torch.randn(x.shape, generator=gen)
    return SyntheticData(x=x, directions=directions, activations=acts.to_sparse() if sparse else acts, hierarchy=hierarchy)


# ---------------------------------------------------------------- metrics against the truth


def cosine_matrix(W_dec: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """[d_sae, F] cosines between learned decoder rows W_dec [d_sae, d] and true directions [F, d]."""
    if W_dec.dim() != 2 or directions.dim() != 2 or W_dec.shape[1] != directions.shape[1]:
        raise ValueError(
            f"need W_dec [d_sae, d] and directions [F, d] with the same d, got "
            f"{tuple(W_dec.shape)} and {tuple(directions.shape)}"
        )
    a = W_dec.detach().double()
    b = directions.detach().double()
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return a @ b.t()


def _assignment(score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Maximum-weight matching of rows to columns of score [r, c]: (row_idx, col_idx).

    scipy's Hungarian algorithm when available, else a greedy matching (best remaining pair first).
    """
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        linear_sum_assignment = None
    if linear_sum_assignment is not None:
        r, c = linear_sum_assignment(score.cpu().numpy(), maximize=True)
        return torch.as_tensor(r, dtype=torch.long), torch.as_tensor(c, dtype=torch.long)
    order = torch.argsort(score.flatten(), descending=True)
    used_r, used_c, rows, cols = set(), set(), [], []
    for flat in order.tolist():
        i, j = divmod(flat, score.shape[1])
        if i not in used_r and j not in used_c:
            used_r.add(i), used_c.add(j), rows.append(i), cols.append(j)
            if len(rows) == min(score.shape):
                break
    return torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)


def match_features(W_dec: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """For each true feature, the learned latent matched to it one-to-one (Hungarian on cosine).

    Returns [F] int64 latent index (−1 for a feature left unmatched when d_sae < F).
    """
    cos = cosine_matrix(W_dec, directions)
    rows, cols = _assignment(cos)
    out = torch.full((directions.shape[0],), -1, dtype=torch.long)
    out[cols] = rows
    return out


def dictionary_metrics(W_dec: torch.Tensor, directions: torch.Tensor, threshold: float = 0.9) -> dict:
    """Learned decoder W_dec [d_sae, d] against true directions [F, d].

    mmcs: mean over true features of the max cosine with any learned row.
    mcc: mean cosine of a one-to-one (Hungarian) matching, over min(d_sae, F) pairs
        (the dictionary-learning "mean correlation coefficient" of directions).
    frac_recovered: fraction of true features whose best cosine exceeds `threshold`.
    """
    cos = cosine_matrix(W_dec, directions)
    best = cos.max(dim=0).values  # per true feature
    rows, cols = _assignment(cos)
    return {
        "mmcs": float(best.mean()),
        "mcc": float(cos[rows, cols].mean()),
        "frac_recovered": float((best > threshold).double().mean()),
    }


def hierarchy_absorption(latents: torch.Tensor, matched: torch.Tensor, hierarchy: list, true_acts: torch.Tensor) -> dict:
    """Absorption on the hierarchy: among tokens where a child fires (so its parent too),
    the fraction where the latent matched to the parent stays silent while the latent
    matched to the child fires (the child latent has absorbed the parent direction).

    Args:
        latents: [N, d_sae] SAE latents on the synthetic x.
        matched: [F] int64 from match_features (true feature -> latent, −1 if none).
        hierarchy: [(parent, [children])] from SyntheticData.
        true_acts: [N, F] the true activations (dense or sparse).

    Returns {"absorption_rate", "parent_recall": fraction of parent-firing tokens on which
    the parent latent fires, "n_child_tokens"}.
    """
    acts = true_acts.to_dense() if true_acts.is_sparse else true_acts
    if latents.shape[0] != acts.shape[0]:
        raise ValueError(f"latents have {latents.shape[0]} tokens but true_acts have {acts.shape[0]}")
    on = latents != 0
    absorbed = child_tokens = parent_tokens = parent_hits = 0
    for parent, children in hierarchy:
        lp = int(matched[parent])
        p_on = acts[:, parent] > 0
        parent_tokens += int(p_on.sum())
        if lp >= 0:
            parent_hits += int((p_on & on[:, lp]).sum())
        for child in children:
            lc = int(matched[child])
            c_on = acts[:, child] > 0
            child_tokens += int(c_on.sum())
            if lc < 0:
                continue
            parent_silent = ~on[:, lp] if lp >= 0 else torch.ones_like(c_on)
            absorbed += int((c_on & parent_silent & on[:, lc]).sum())
    return {
        "absorption_rate": absorbed / child_tokens if child_tokens else float("nan"),
        "parent_recall": parent_hits / parent_tokens if parent_tokens else float("nan"),
        "n_child_tokens": child_tokens,
    }


def evaluate_against_truth(sae, data: SyntheticData, threshold: float = 0.9) -> dict:
    """All ground-truth metrics for an SAE (anything with encode(x) and W_dec [d_sae, d])."""
    with torch.no_grad():
        latents = sae.encode(data.x)
    out = dictionary_metrics(sae.W_dec, data.directions, threshold)
    if data.hierarchy:
        matched = match_features(sae.W_dec, data.directions)
        out.update(hierarchy_absorption(latents, matched, data.hierarchy, data.activations))
    return out


# ---------------------------------------------------------------- ground truth written elsewhere


@dataclass
class SAELensSyntheticConfig:
    """SAELens's synthetic generator (sae_lens.synthetic.SyntheticModel, SynthSAEBench-style):
    Zipfian firing probabilities, a forest of depth-1 hierarchies whose children are
    mutually exclusive and fire only with their parent (probabilities compensated so that
    children still fire), unit feature vectors and a bias of norm 1.

    d: hidden dimension; n_features: true features; n_parents, children_per_parent: the
    hierarchy; max_prob, min_prob, zipf_exponent: the firing probabilities; model_seed:
    the generator's own seed (features, hierarchy, probabilities)."""

    d: int = 64
    n_features: int = 128
    n_parents: int = 8
    children_per_parent: int = 3
    max_prob: float = 0.2
    min_prob: float = 0.02
    zipf_exponent: float = 1.0
    model_seed: int = 0


def saelens_model(cfg: SAELensSyntheticConfig):
    """The sae_lens SyntheticModel for cfg (needs sae-lens >= 6 with sae_lens.synthetic)."""
    try:
        from sae_lens.synthetic import HierarchyConfig, SyntheticModel, SyntheticModelConfig, ZipfianFiringProbabilityConfig
    except ImportError as err:
        raise ImportError(f"SAELens's synthetic generator is not importable ({err}); pip install 'sae-lens>=6'") from err
    return SyntheticModel(SyntheticModelConfig(
        num_features=cfg.n_features, hidden_dim=cfg.d,
        firing_probability=ZipfianFiringProbabilityConfig(exponent=cfg.zipf_exponent, max_prob=cfg.max_prob,
                                                          min_prob=cfg.min_prob),
        hierarchy=HierarchyConfig(total_root_nodes=cfg.n_parents, branching_factor=cfg.children_per_parent,
                                  max_depth=1, mutually_exclusive_portion=1.0, compensate_probabilities=True),
        seed=cfg.model_seed,
    ))


def _saelens_hierarchy(roots) -> list:
    """[(parent, [children])] for every node with children, from SAELens's HierarchyNode trees."""
    out, stack = [], list(roots)
    while stack:
        node = stack.pop()
        kids = [c.feature_index for c in node.children if c.feature_index is not None]
        if node.feature_index is not None and kids:
            out.append((int(node.feature_index), [int(c) for c in kids]))
        stack.extend(node.children)
    return sorted(out)


def generate_saelens(cfg: SAELensSyntheticConfig, n_samples: int, seed: int = 0, model=None) -> SyntheticData:
    """n_samples tokens from SAELens's generator as SyntheticData (so the same ground-truth
    metrics apply). SAELens samples from torch's global generator: it is seeded with `seed`
    inside torch.random.fork_rng, so the caller's random state is left as it was."""
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    model = saelens_model(cfg) if model is None else model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        x, acts = model.sample_with_features(n_samples)
    hierarchy = _saelens_hierarchy(model.hierarchy.roots) if model.hierarchy is not None else []
    directions = model.feature_dict.feature_vectors.detach().float()
    return SyntheticData(x=x.detach().float(), directions=directions / directions.norm(dim=1, keepdim=True),
                         activations=acts.detach().float().to_dense() if acts.is_sparse else acts.detach().float(),
                         hierarchy=hierarchy)
