"""The width sweep's float64 checks on a tiny SAE: every arm it times agrees with the dense
reference before a number is taken. In pyproject's testpaths, so the README's test command (and CI)
runs it; the sparsify arm only where the `bench` extra is installed."""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import width_arms  # noqa: E402
import width_sweep  # noqa: E402

from aosae.ops.gram_topk import k_for_fraction  # noqa: E402

HAS_SPARSIFY = importlib.util.find_spec("sparsify") is not None


def check_args(tmp_path, arm: str, width: int = 512) -> types.SimpleNamespace:
    x = torch.randn(512, 32, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "x.pt"
    torch.save(x, path)
    return types.SimpleNamespace(data=str(path), batch=128, seed=0, arm=arm, d_in=32, width=width, k=8, check_tol=1e-4)


@pytest.mark.parametrize("arm", [a for a in width_sweep.ARMS if a != "sparsify-topk" or HAS_SPARSIFY])
def test_every_arm_passes_its_check(tmp_path, arm):
    result = width_arms.run_check(check_args(tmp_path, arm))
    assert result["max_rel_gap"] <= 1e-4
    if arm.endswith("+penalty"):  # at n = 512 the top-k is a real selection among more co-active pairs
        pairs = result["penalty_pairs"]
        assert pairs["selected"] == pairs["expected"] < pairs["co_active_pairs"]


def test_check_catches_a_wrong_step(tmp_path, monkeypatch):
    """A step whose encoder gradient is off must fail the check (the check can fail)."""
    from aosae.training.step import SAEObjective

    real = SAEObjective.losses

    def skewed(self, x):
        out = real(self, x)
        return out._replace(loss=out.loss + 1e-3 * self.sae.W_enc[0, 0] ** 2)

    monkeypatch.setattr(SAEObjective, "losses", skewed)
    with pytest.raises(AssertionError, match="disagrees with the float64 reference"):
        width_arms.run_check(check_args(tmp_path, "aosae-topk"))


def test_penalty_reference_rejects_a_selection_that_is_not_a_top_k():
    """The penalty reference flags a selection that leaves out a larger score than it keeps."""
    g = torch.Generator().manual_seed(1)
    d_in, n, rows = 16, 64, 32
    params = {"W_enc": torch.randn(d_in, n, generator=g, dtype=torch.float64),
              "b_enc": torch.zeros(n, dtype=torch.float64),
              "W_dec": torch.randn(n, d_in, generator=g, dtype=torch.float64),
              "b_dec": torch.zeros(d_in, dtype=torch.float64)}
    xs = torch.randn(rows, d_in, generator=g, dtype=torch.float64)
    pre = xs @ params["W_enc"]
    idx = pre.topk(4, dim=-1).indices
    f = torch.zeros_like(pre).scatter(-1, idx, torch.relu(pre.gather(-1, idx)))
    c = (f.t() @ f).triu(1).abs()
    order = c.flatten().argsort(descending=True)
    k = k_for_fraction(n, width_sweep.FRACTION)
    good = order[:k]
    bad = torch.cat([order[1:k], order[k:k + 1]])  # drops the best pair for the (k+1)-th
    _, _, _, _, ok = width_arms.reference_losses(params, xs, "topk", 4, 0.0, 1.0, (good // n, good % n))
    _, _, _, _, wrong = width_arms.reference_losses(params, xs, "topk", 4, 0.0, 1.0, (bad // n, bad % n))
    assert ok["left_out_above_kth"] == 0.0
    assert wrong["left_out_above_kth"] > 1e-3

