"""`aosae export RUN --to saelens` writes a directory SAELens loads by itself."""
from __future__ import annotations

import pytest
import sae_lens  # installed by .ci/install_integrations.sh, as the README's test command does
import torch

from aosae import SparseAutoencoder
from aosae.cli import main


@pytest.mark.parametrize("activation", ["relu", "topk"])
def test_export_to_saelens_round_trips(tmp_path, activation, capsys):
    sae = SparseAutoencoder.from_dims(12, 40, activation=activation, top_k=5 if activation == "topk" else None)
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    run = sae.save(tmp_path / "run")
    assert main(["export", str(run), "--to", "saelens", "--out", str(tmp_path / "sl")]) == 0
    assert "load_from_disk" in capsys.readouterr().out
    loaded = sae_lens.SAE.load_from_disk(str(tmp_path / "sl"))
    x = torch.randn(16, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), sae(x).x_hat, rtol=1e-5, atol=1e-5)
