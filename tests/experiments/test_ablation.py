"""The ablation: a couple of arms for a few steps through the CLI (outputs exist, numbers sane),
and the L0-matched comparison on hand-built runs."""
import json
import math

import pytest

from aosae.cli import main as cli_main
from aosae.experiments.ablation import compare as C
from aosae.experiments.ablation import parse_arms


def test_cli_ablate_two_arms(tmp_path):
    out = tmp_path / "abl"
    rc = cli_main(["ablate", "--out", str(out), "--sweeps", "synthetic", "--arms", "paper,paper_budget",
                   "--seeds", "2", "--lambdas", "0.3", "--steps", "20", "--samples", "3000", "--d", "16",
                   "--features", "32", "--d-sae", "32", "--batch-size", "128"])
    assert rc == 0
    runs = json.loads((out / "runs.json").read_text())["sweeps"]["synthetic"]["runs"]
    assert {r["arm"] for r in runs} == {"none", "paper", "paper_budget"}  # none joins: it sets the budget
    assert len(runs) == 3 * 2
    for r in runs:
        for key in ("l0", "fvu", "mmcs", "mcc", "frac_recovered", "absorption_rate", "train_fvu_end"):
            assert math.isfinite(r[key]), (r["arm"], key)
        assert 0 <= r["fvu"] <= 1.5 and 0 <= r["mmcs"] <= 1 and r["l0"] > 0
        assert r["duplicate_pairs"] >= 0
        if r["arm"] == "none":
            assert r["tau_trajectory"] == [] and r["budget_fvu_end"] is None
        else:
            assert 0 < r["nonzero_share"] <= 1 and len(r["tau_trajectory"]) > 5
    budget = [r for r in runs if r["arm"] == "paper_budget"]
    assert all(1e-4 <= tau <= 1e2 for r in budget for _, tau in r["tau_trajectory"])
    paper = [r for r in runs if r["arm"] == "paper"]
    assert all(0.01 <= tau <= 0.2 for r in paper for _, tau in r["tau_trajectory"])
    # the budget follows the penalty-free run of the same λ and seed
    none = {(r["value"], r["seed"]): r["train_fvu_end"] for r in runs if r["arm"] == "none"}
    for r in budget:
        assert r["budget_fvu_end"] == pytest.approx(1.05 * none[(r["value"], r["seed"])])
    md = (out / "README.md").read_text()
    assert "### Verdict" in md and "| paper_budget |" in md
    for png in ("pareto_synthetic.png", "tau_synthetic.png"):
        assert (out / png).stat().st_size > 1000
    analysis = json.loads((out / "ablation.json").read_text())
    assert set(analysis["sweeps"]["synthetic"]["verdict"]) == {"paper", "paper_budget"}
    assert cli_main(["ablate", "--out", str(out), "--render-only"]) == 0


def test_mean_ci_and_interpolate():
    m, ci = C.mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and ci == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    assert math.isnan(C.mean_ci([5.0])[1])
    pts = [(1.0, 0.0), (100.0, 2.0)]
    assert C.interpolate(pts, 10.0) == pytest.approx(1.0)  # linear in log L0
    assert C.interpolate(pts, 1000.0) is None
    assert C.interpolate(pts, 110.0) == pytest.approx(2.0 + 2 * math.log(1.1) / math.log(100))  # end segment extended


def _run(arm, seed, value, l0, **m):
    return {"arm": arm, "seed": seed, "value": value, "l0": l0, **m}


def test_matched_reads_every_arm_at_the_penalty_free_l0():
    # arm "a" is the penalty-free curve shifted to twice the L0 (same FVU at 2× L0) and +0.1 MMCS
    runs = []
    for s in range(3):
        for v, l0 in ((0.1, 4.0), (0.2, 8.0), (0.4, 16.0)):
            fvu = 1.0 / l0
            runs.append(_run("none", s, v, l0, fvu=fvu, mmcs=0.5 + 0.01 * s, absorption_rate=0.2))
            runs.append(_run("a", s, v, 2 * l0, fvu=fvu, mmcs=0.6 + 0.01 * s, absorption_rate=0.1))
    match = C.matched(runs, topk=False, metrics=("fvu", "mmcs", "absorption_rate"))
    assert match["targets"] == pytest.approx([math.sqrt(32), 8.0, math.sqrt(128)])
    assert match["a"]["fvu"][0] is None  # L0 √32 lies below arm a's curve (from 8) by more than 15%
    assert match["a"]["fvu"][1][0] == pytest.approx(1 / 4 - 1 / 8)  # at L0 8 arm a has its λ=0.1 point
    assert match["a"]["mmcs"][2][0] == pytest.approx(0.1) and match["a"]["mmcs"][2][1] == pytest.approx(0.0)
    verdict = C.verdict(match, slack=0.05, ground_truth=True)["a"]
    assert verdict["mmcs_better"] == 2 and verdict["absorption_better"] == 2 and verdict["fvu_worse"] == 2
    assert verdict["wins"] == 0  # better recovery bought with reconstruction does not count


def test_parse_arms():
    assert parse_arms("decoder") == ("none", "decoder")
    with pytest.raises(ValueError, match="unknown"):
        parse_arms("nope")


@pytest.mark.parametrize("over", [dict(penalty="coact_x_decoder"), dict(penalty="decoder_on_coactive"),
                                  dict(penalty="decoder"), dict(pair_rule="coactive", fraction=0.2),
                                  dict(similarity="cosine", tau_rule="budget", tau_budget=0.5)])
def test_trainer_runs_each_penalty_and_rule(tmp_path, over):
    from aosae.data import synthetic as S
    from aosae.experiments.ablation import train_run
    from aosae.training.config import TrainConfig

    data = S.generate(S.SyntheticConfig(d=8, n_features=16, n_parents=1), 1200, seed=0)
    held = S.generate(S.SyntheticConfig(d=8, n_features=16, n_parents=1), 300, seed=1)
    cfg = TrainConfig(steps=6, batch_size=64, tokens=1200, d_sae=16, l1=0.1, lr=1e-3, checkpoint_every=100,
                      device="cpu", **over)
    res = train_run(data.x, cfg, held.x, held, tmp_path / "run")
    assert math.isfinite(res["fvu"]) and math.isfinite(res["train_fvu_end"]) and len(res["tau_trajectory"]) == 6
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["penalty"]) for r in rows) and any(r["penalty"] > 0 for r in rows)


def test_model_sweep_scores_sparse_probing_and_scr_per_run(tmp_path, monkeypatch):
    """The model sweep on a tiny LM with a tiny task set: every run carries SAEBench's probing and
    SCR/TPP scores, and the report reads them at matched L0 (tables, verdict, ablation.json)."""
    from dataclasses import asdict

    pytest.importorskip("transformers")
    pytest.importorskip("sklearn")
    pytest.importorskip("scipy")
    from tiny_lm import make_tiny_lm, tiny_task_set

    from aosae.cli.ablate import AblateArgs
    from aosae.experiments.ablation import ARMS, Sweep, load_dataset, run_sweep
    from aosae.experiments.ablation.report import write_report

    monkeypatch.setenv("AOSAE_CACHE", str(tmp_path / "cache"))
    lm = str(make_tiny_lm(tmp_path / "lm"))
    train, held, truth, desc, scorer = load_dataset("model", model=lm, layer=1, tokens=2000, lm_tokens=32, probing=True,
                                                    probing_tasks=tiny_task_set(), probing_seeds=(3, 4))
    assert truth is None and "tiny test set" in desc["probing"]
    base = dict(steps=12, batch_size=128, tokens=train.shape[0], lr=5e-3, checkpoint_every=10**9, device="cpu", d_sae=48)
    sweep = Sweep("model", base, (0.02, 0.05, 0.1), seeds=(0, 1))
    runs = run_sweep(sweep, train, held, None, ("none", "paper"), log=lambda m: None, scorer=scorer)
    assert len(runs) == 3 * 2 * 2
    for r in runs:
        for key in ("sae_test_accuracy", "sae_top_1_test_accuracy", "tpp_threshold_20_total_metric", "ce_loss_score"):
            assert math.isfinite(r[key]), (r["arm"], key)
        # 48 latents: thresholds above are left out (SCR's metric itself is absent when the random LM's
        # biased probe scores alike on both classes, as in SAEBench: the verdict test below covers SCR)
        assert 0 <= r["sae_top_1_test_accuracy"] <= 1 and "tpp_threshold_50_total_metric" not in r
    args = asdict(AblateArgs(sweeps="model"))
    record = {"args": args, "arms": {a: asdict(ARMS[a]) for a in ARMS},
              "sweeps": {"model": {"args": args, "arms": ["none", "paper"], "description": desc, "swept": "l1",
                                   "values": list(sweep.values), "base": base, "slack": 0.05, "ground_truth": False,
                                   "seconds": 1.0, "runs": runs}}}
    analysis = write_report(record, tmp_path / "out", plots=False)
    verdict = analysis["sweeps"]["model"]["verdict"]["paper"]
    n = verdict["targets"]
    assert 0 <= verdict["sae_top_1_test_accuracy_better"] + verdict["sae_top_1_test_accuracy_worse"] <= verdict["targets"]
    md = (tmp_path / "out" / "README.md").read_text()
    assert "sparse probing top-1 better at" in md and " top-1 acc |" in md and "Δtop-1 acc" in md


def test_verdict_counts_the_papers_claims_at_matched_l0():
    # arm "a": +0.05 top-1 accuracy and −0.1 SCR@2 at every λ, same L0 and FVU; arm "b": equal to none
    runs = []
    for s in range(3):
        for v, l0 in ((0.1, 40.0), (0.2, 20.0), (0.4, 10.0)):
            base = dict(fvu=0.2, sae_top_1_test_accuracy=0.6 + 0.01 * s, scr_metric_threshold_2=0.3 - 0.02 * s)
            runs.append(_run("none", s, v, l0, **base))
            runs.append(_run("a", s, v, l0, **{**base, "sae_top_1_test_accuracy": 0.65 + 0.01 * s,
                                                "scr_metric_threshold_2": 0.2 - 0.02 * s}))
            runs.append(_run("b", s, v, l0, **base))
    match = C.matched(runs, topk=False)
    verdict = C.verdict(match, slack=0.05, ground_truth=False)
    n = len(match["targets"])
    assert verdict["a"]["sae_top_1_test_accuracy_better"] == n and verdict["a"]["sae_top_1_test_accuracy_worse"] == 0
    assert verdict["a"]["scr_metric_threshold_2_worse"] == n and verdict["a"]["scr_metric_threshold_2_better"] == 0
    assert verdict["b"]["scr_metric_threshold_2_better"] == verdict["b"]["scr_metric_threshold_2_worse"] == 0
    assert "sae_top_5_test_accuracy_better" not in verdict["a"]  # not measured, not counted


@pytest.mark.parametrize("argv,says", [
    (["--sweeps", "synthetic", "--samples", "300", "--batch-size", "512"], "lower --batch-size or raise --samples"),
    (["--sweeps", "model", "--model-tokens", "1200"], "raise --model-tokens"),
    (["--sweeps", "model", "--model-d-sae", "0"], "--model-d-sae must be an int >= 1"),
    (["--sweeps", "model", "--probing-tasks", "nonsense"], "unknown SAEBench dataset"),
])
def test_ablate_options_are_checked_before_any_work(tmp_path, capsys, argv, says):
    out = tmp_path / "abl"
    assert cli_main(["ablate", "--out", str(out), *argv]) != 0
    assert says in capsys.readouterr().err and not out.exists()


def test_render_only_refuses_an_unknown_arm_before_touching_a_file(tmp_path, capsys):
    out = tmp_path / "abl"
    assert cli_main(["ablate", "--out", str(out), "--sweeps", "synthetic", "--arms", "paper", "--seeds", "1",
                     "--lambdas", "0.3", "--steps", "5", "--samples", "1000", "--d", "16", "--features", "32",
                     "--d-sae", "32", "--batch-size", "128"]) == 0
    record = json.loads((out / "runs.json").read_text())
    record["sweeps"]["synthetic"]["runs"][-1]["arm"] = "paper_v2"
    (out / "runs.json").write_text(json.dumps(record))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert cli_main(["ablate", "--out", str(out), "--render-only"]) != 0
    assert "arm 'paper_v2', which is not one of" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_sweep_stopped_midway_keeps_its_runs(tmp_path, monkeypatch, capsys):
    """runs.json is rewritten after every run: a call stopped in its third run keeps the first two,
    marked incomplete, and --render-only turns them into tables."""
    from aosae.experiments.ablation import runner

    real, calls = runner.train_run, []

    def stop_at_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "train_run", stop_at_third)
    out = tmp_path / "abl"
    with pytest.raises(KeyboardInterrupt):
        cli_main(["ablate", "--out", str(out), "--sweeps", "synthetic", "--arms", "paper", "--seeds", "2",
                  "--lambdas", "0.3", "--steps", "5", "--samples", "1000", "--d", "16", "--features", "32",
                  "--d-sae", "32", "--batch-size", "128"])
    sweep = json.loads((out / "runs.json").read_text())["sweeps"]["synthetic"]
    assert sweep["complete"] is False and [(r["arm"], r["seed"]) for r in sweep["runs"]] == [("none", 0), ("paper", 0)]
    assert cli_main(["ablate", "--out", str(out), "--render-only"]) == 0
    assert "**incomplete**" in (out / "README.md").read_text()


def test_a_sweep_redone_with_other_settings_warns_before_it_replaces_the_record(tmp_path):
    out = tmp_path / "abl"
    argv = ["ablate", "--out", str(out), "--sweeps", "synthetic", "--arms", "paper", "--seeds", "1", "--lambdas", "0.3",
            "--samples", "1000", "--d", "16", "--features", "32", "--d-sae", "32", "--batch-size", "128"]
    assert cli_main([*argv, "--steps", "5"]) == 0
    with pytest.warns(UserWarning, match="holds a synthetic sweep run with other settings"):
        assert cli_main([*argv, "--steps", "6"]) == 0
    assert json.loads((out / "runs.json").read_text())["sweeps"]["synthetic"]["base"]["steps"] == 6


def test_a_sweep_with_the_same_settings_is_extended_not_retrained(tmp_path, monkeypatch, capsys):
    """Another λ list on a recorded sweep trains only the (λ, seed) groups the record lacks; a call
    stopped midway keeps every recorded run; a group missing an arm is retrained whole."""
    from aosae.experiments.ablation import runner

    real, calls, stop_at = runner.train_run, [], [None]

    def counted(acts, cfg, *args, **kwargs):
        calls.append((cfg.l1, cfg.seed, cfg.penalty))
        if len(calls) == stop_at[0]:
            raise KeyboardInterrupt
        return real(acts, cfg, *args, **kwargs)

    monkeypatch.setattr(runner, "train_run", counted)
    out = tmp_path / "abl"
    argv = ["ablate", "--out", str(out), "--sweeps", "synthetic", "--arms", "paper_budget", "--seeds", "1", "--steps", "5",
            "--samples", "1000", "--d", "16", "--features", "32", "--d-sae", "32", "--batch-size", "128"]
    assert cli_main([*argv, "--lambdas", "0.3"]) == 0
    first = json.loads((out / "runs.json").read_text())["sweeps"]["synthetic"]["runs"]
    assert [(r["arm"], r["value"]) for r in first] == [("none", 0.3), ("paper_budget", 0.3)]

    calls.clear()
    stop_at[0] = 2  # stopped in the new group's second run: the recorded runs and its first stay on disk
    with pytest.raises(KeyboardInterrupt):
        cli_main([*argv, "--lambdas", "0.5"])
    sweep = json.loads((out / "runs.json").read_text())["sweeps"]["synthetic"]
    assert sweep["complete"] is False and sweep["runs"][:2] == first
    assert [(r["arm"], r["value"]) for r in sweep["runs"][2:]] == [("none", 0.5)]

    calls.clear()
    stop_at[0] = None
    capsys.readouterr()
    assert cli_main([*argv, "--lambdas", "0.3,0.5"]) == 0
    assert [c[:2] for c in calls] == [(0.5, 0), (0.5, 0)]  # λ 0.5 lacked paper_budget: its group reran whole
    assert "reusing 1 of 2 (l1, seed) groups (0.3/0)" in capsys.readouterr().out
    sweep = json.loads((out / "runs.json").read_text())["sweeps"]["synthetic"]
    assert sweep["complete"] is True and sweep["values"] == [0.3, 0.5] and sweep["args"]["lambdas"] == "0.3,0.5"
    assert sweep["runs"][:2] == first and [(r["arm"], r["value"]) for r in sweep["runs"][2:]] == [
        ("none", 0.5), ("paper_budget", 0.5)]
    # the budget of the new group follows its own penalty-free run
    assert sweep["runs"][3]["budget_fvu_end"] == pytest.approx(1.05 * sweep["runs"][2]["train_fvu_end"])
    md = (out / "README.md").read_text()
    assert "| 0.3 |" in md and "| 0.5 |" in md and "--lambdas 0.3,0.5" in md and "--no-reuse" in md

    calls.clear()
    assert cli_main([*argv, "--lambdas", "0.5"]) == 0  # everything recorded: nothing trains, the record stays whole
    assert calls == [] and "nothing to train" in capsys.readouterr().out
    assert json.loads((out / "runs.json").read_text())["sweeps"]["synthetic"]["runs"] == sweep["runs"]
    with pytest.warns(UserWarning, match="--no-reuse and other values"):  # retrains; the record becomes this call's
        assert cli_main([*argv, "--lambdas", "0.5", "--no-reuse"]) == 0
    assert len(calls) == 2 and json.loads((out / "runs.json").read_text())["sweeps"]["synthetic"]["values"] == [0.5]
