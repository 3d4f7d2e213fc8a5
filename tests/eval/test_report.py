"""aosae.report: markdown + PNG from a run directory's metrics.jsonl."""
import json

import pytest
import torch

from aosae.eval.report import read_metrics, write_report


def test_write_report(tmp_path, seed):
    rows = [{"step": s, "loss": 2.0 / (s + 1), "recon": 1.0 / (s + 1), "l1": 0.5, "penalty": 0.1,
             "tau": 0.05 + 0.001 * s, "l0": 30.0 - 0.1 * s, "lr": 1e-3} for s in range(50)]
    lines = [json.dumps(r) for r in rows] + ['{"step": 50, "loss"']  # a truncated last line is skipped
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    (tmp_path / "summary.json").write_text(json.dumps({"final_l0": 25.0, "note": "text is skipped"}))
    density = torch.rand(64) * 0.3
    density[:5] = 0
    md = write_report(tmp_path, density=density)
    text = md.read_text()
    assert len(read_metrics(tmp_path)) == 50
    assert "| tau | 0.099 |" in text
    assert "final_l0" in text and "note" not in text
    assert "dead (never fired): 5 of 64" in text
    assert (tmp_path / "report.png").stat().st_size > 5000


def test_missing_metrics(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        write_report(tmp_path)
