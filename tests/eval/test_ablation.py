"""A short ablation on synthetic data: every arm runs, the table and plots are written,
numbers are finite, and the arms really differ where they should."""
import json
import math

import pytest
import torch

from aosae.eval import ablation as A
from aosae.data import synthetic as S
from aosae.cli import main as cli_main


def test_cli_ablate_synthetic(tmp_path):
    out = tmp_path / "abl"
    rc = cli_main(["ablate", "--out", str(out), "--data", "synthetic", "--steps", "30", "--samples", "3000",
                   "--d", "16", "--features", "32", "--batch-size", "128"])
    assert rc == 0
    md = (out / "synthetic.md").read_text()
    for arm in A.ARMS:
        assert f"| {arm} |" in md
    for png in ("metrics_vs_step.png", "tau.png", "recovered.png"):
        assert (out / "synthetic" / png).stat().st_size > 1000
    data = json.loads((out / "synthetic" / "results.json").read_text())
    for arm in A.ARMS:
        final = data["results"][arm]["final"]
        for key in ("cossim", "explained_variance", "l0", "mmcs", "mcc", "frac_recovered", "decoder_cos_max",
                    "topk_abs_c_mean", "all_abs_c_mean"):
            assert math.isfinite(final[key]), (arm, key)
    taus = {arm: [row["tau"] for row in data["results"][arm]["log"]] for arm in A.ARMS}
    assert set(taus["none"]) == {0.0}
    assert set(taus["fixed_0.05"]) == {0.05} and set(taus["fixed_0.2"]) == {0.2}
    assert all(0.01 <= t <= 0.2 for t in taus["adaptive"])
    pen = {arm: [row["penalty"] for row in data["results"][arm]["log"]] for arm in A.ARMS}
    assert all(p == 0.0 for p in pen["none"]) and any(p > 0 for p in pen["adaptive"])


def test_arms_share_init_and_batches(seed):
    """Matched settings: with 1 step at lr→0 the arms without a penalty gradient start identical."""
    data = S.generate(S.SyntheticConfig(d=8, n_features=16, n_parents=0), 600, seed=seed)
    cfg = A.AblationConfig(steps=3, batch_size=64, d_sae=16, lr=1e-3, log_every=1, seed=seed)
    sae_a, rows_a = A.train_arm("none", data.x, cfg)
    sae_b, rows_b = A.train_arm("none", data.x, cfg)
    torch.testing.assert_close(sae_a.W_dec, sae_b.W_dec)
    assert rows_a[0]["recon"] == rows_b[0]["recon"]
    _, rows_c = A.train_arm("fixed_0.2", data.x, cfg)
    assert rows_c[0]["recon"] == rows_a[0]["recon"]  # same init, same first batch
    assert rows_c[-1]["penalty"] > 0


def test_multi_seed_table_has_std(seed):
    data = S.generate(S.SyntheticConfig(d=8, n_features=16, n_parents=0), 800, seed=seed)
    held = S.generate(S.SyntheticConfig(d=8, n_features=16, n_parents=0), 300, seed=seed + 1)
    cfg = A.AblationConfig(steps=20, batch_size=64, d_sae=16, log_every=5)
    res = A.run_ablation(data.x, held.x, cfg, truth=held, arms=("none", "adaptive"), seeds=(0, 1), log=lambda s: None)
    assert len(res["none"]["runs"]) == 2
    assert "±" in A.markdown_table(res)


def test_unknown_arm_is_rejected():
    with pytest.raises(ValueError, match="unknown arm"):
        A.run_ablation(torch.zeros(10, 4), torch.zeros(10, 4), A.AblationConfig(steps=1, batch_size=4, d_sae=4),
                       arms=("bogus",))
