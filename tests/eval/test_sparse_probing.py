"""Sparse probing (SAEBench's definitions), the probing texts' activations and the task sets."""
import json

import pytest
import torch

from aosae.eval import sparse_probing as P
from aosae.eval import tasks as T
from aosae.eval.saebench_tasks import SAEBENCH_PROBING
from aosae.eval.text_activations import TextActivations, cached_activations, collect, segment_mean

pytest.importorskip("sklearn", reason="sparse probing needs scikit-learn (aosae[eval])")


def _ragged(gen, n_texts, d, max_len=7):
    lengths = torch.randint(1, max_len, (n_texts,), generator=gen)
    rows = torch.randn(int(lengths.sum()), d, generator=gen)
    return TextActivations(rows, torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]))


def test_pooling_matches_float64_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    acts = _ragged(gen, 9, 5)
    ref = torch.stack([acts.rows[a:b].double().mean(0) for a, b in zip(acts.offsets[:-1], acts.offsets[1:])])
    torch.testing.assert_close(acts.pooled().double(), ref, rtol=1e-6, atol=1e-6)
    from aosae.nn.sae import SparseAutoencoder

    sae = SparseAutoencoder.from_dims(5, 11)
    with torch.no_grad():
        f = sae.encode(acts.rows)
    ref = torch.stack([f[a:b].double().mean(0) for a, b in zip(acts.offsets[:-1], acts.offsets[1:])])
    torch.testing.assert_close(acts.sae_pooled(sae, chunk_tokens=4).double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(segment_mean(acts.rows.double(), acts.offsets), acts.pooled().double(), rtol=1e-6, atol=1e-6)


def test_text_activations_rejects_bad_offsets():
    with pytest.raises(ValueError, match="at least one kept token"):
        TextActivations(torch.zeros(3, 2), torch.tensor([0, 0, 3]))
    with pytest.raises(ValueError, match="offsets end at"):
        TextActivations(torch.zeros(3, 2), torch.tensor([0, 2]))


def test_one_vs_rest_is_balanced_and_draws_negatives_from_other_classes(seed):
    acts = {c: torch.full((n, 1), float(i)) for i, (c, n) in enumerate([("a", 7), ("b", 3), ("c", 9)])}
    x, y = P.one_vs_rest(acts, "a")
    assert x.shape == (14, 1) and int(y.sum()) == 7
    assert bool((x[y == 1] == 0).all()) and bool((x[y == 0] != 0).all())
    # ceil(7 / 2) = 4 drawn per other class, but "b" has 3: 3 + 4 = 7 negatives
    assert sorted(x[y == 0].flatten().tolist()).count(1.0) == 3
    x, y = P.one_vs_rest(acts, "a", paired="c")
    assert bool((x[y == 0] == 2).all())
    with pytest.raises(ValueError, match="negatives"):
        P.one_vs_rest({"a": torch.zeros(5, 1), "b": torch.ones(2, 1)}, "a")


def test_top_k_dims_is_largest_mean_difference(seed):
    x = torch.randn(40, 12, dtype=torch.float64)
    y = torch.randint(0, 2, (40,), dtype=torch.int32)
    y[:2] = torch.tensor([0, 1], dtype=torch.int32)
    diff = (x[y == 1].mean(0) - x[y == 0].mean(0)).abs()
    for k in (1, 3, 12, 50):
        dims = P.top_k_dims(x, y, k)
        assert dims.tolist() == sorted(torch.argsort(diff, descending=True)[:k].tolist())


def test_probes_find_a_planted_class_signal(seed):
    """Each class moves one dimension: all-dimension and top-1 probes reach ~100%, a label-free
    dimension set reaches chance."""
    gen = torch.Generator().manual_seed(seed)
    classes = ["a", "b", "c"]
    def make(n):
        out = {}
        for i, c in enumerate(classes):
            x = 0.3 * torch.randn(n, 6, generator=gen)
            x[:, i] += 3.0
            out[c] = x
        return out
    train, test = make(400), make(50)  # several probe batches per epoch: SAEBench stops after 10 epochs without gain
    means, per_class = P.dataset_probing(train, test, train, test, k_values=(1, 2), seed=seed)
    assert means["llm_test_accuracy"] > 0.97 and means["sae_top_1_test_accuracy"] > 0.97
    assert set(per_class["llm_top_2_test_accuracy"]) == set(classes)
    noise = {c: torch.randn(60, 4, generator=gen) for c in classes}
    noise_test = {c: torch.randn(200, 4, generator=gen) for c in classes}
    means, _ = P.dataset_probing(noise, noise_test, noise, noise_test, k_values=(1,), seed=seed)
    assert 0.35 < means["sae_top_1_test_accuracy"] < 0.65


def test_same_seed_same_numbers_and_llm_half_reusable(seed):
    gen = torch.Generator().manual_seed(seed)
    tr = {c: torch.randn(20, 4, generator=gen) + i for i, c in enumerate("abc")}
    te = {c: torch.randn(10, 4, generator=gen) + i for i, c in enumerate("abc")}
    sae_tr = {c: v.relu() for c, v in tr.items()}
    sae_te = {c: v.relu() for c, v in te.items()}
    a = P.dataset_probing(tr, te, sae_tr, sae_te, (1, 2), seed=7)
    llm, state = P.llm_dataset_probing(tr, te, (1, 2), seed=7)
    P.dataset_probing(tr, te, tr, te, (1,), seed=99)  # moves the global RNG on
    b = P.sae_dataset_probing(sae_tr, sae_te, (1, 2), state)
    assert a[1] == {**llm, **b}


def test_tokenised_texts_drop_bos_eos_pad_and_match_unpadded_forward(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tiny_lm import make_tiny_lm
    from aosae.data.language_models import residual_at

    path = make_tiny_lm(tmp_path / "lm")
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    texts = ["def f(x):\n    return x", "tau = clip(tau * target / recon)", "a" * 3 + tok.eos_token + " b"]
    acts = collect(model, tok, texts, 1, context=8, lm_batch=2)
    for i, text in enumerate(texts):
        ids = torch.tensor([[tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"][:7]])
        h = residual_at(model, ids, torch.ones_like(ids), 1)[0]
        keep = ~torch.isin(ids[0], torch.tensor([tok.bos_token_id, tok.eos_token_id, tok.pad_token_id]))
        torch.testing.assert_close(acts.rows[acts.offsets[i] : acts.offsets[i + 1]], h[keep], rtol=1e-4, atol=1e-5)
    # the cache: a second call reads the store and never runs the LM
    first, directory = cached_activations(model, tok, texts, 1, model_name="tiny", texts_digest="t", context=8,
                                          dtype="float32", cache_dir=tmp_path / "cache")
    torch.testing.assert_close(first.rows, acts.rows, rtol=1e-5, atol=1e-6)

    class NoLM(torch.nn.Module):
        config = model.config

        def parameters(self):
            return model.parameters()

        def forward(self, *a, **k):
            raise AssertionError("the LM ran although the activations are cached")

    again, same_dir = cached_activations(NoLM(), tok, texts, 1, model_name="tiny", texts_digest="t", context=8,
                                         dtype="float32", cache_dir=tmp_path / "cache")
    assert same_dir == directory and torch.equal(again.rows, first.rows)
    assert json.loads((directory / "meta.json").read_text())["kind"] == "probing-texts"


def test_offline_task_set_is_well_formed():
    ts = T.offline_tasks(n_train=20, n_test=10, scr_train=10, scr_test=5)
    assert "not comparable" in ts.note
    assert [t.name for t in ts.probing] == ["stdlib_module_family_code", "stdlib_module_family_docstring",
                                            "stdlib_code_vs_prose"]
    for task in ts.probing:
        train = {i for v in task.train.values() for i in v}
        test = {i for v in task.test.values() for i in v}
        assert not train & test
        assert all(len(v) == 20 for v in task.train.values()) and all(len(v) == 10 for v in task.test.values())
        labels = [c for c, v in task.train.items() for _ in v]
        assert len(labels) == len(train)  # no text in two classes
    for task in ts.scr:
        tr = task.train
        assert set(tr) == set(T.SCR_KEYS) and all(len(v) == 20 for v in tr.values())
        # target and spurious share one quadrant (both positive), which the biased group also draws from
        shared = set(tr["target"]) & set(tr["spurious"])
        assert len(shared) == 10 and shared <= set(tr["biased"])
        assert not set(tr["biased_neg"]) & (set(tr["target"]) | set(tr["spurious"]) | set(tr["biased"]))
    assert ts.tpp and all(name in {t.name for t in ts.probing} for name in ts.tpp)
    assert ts.digest() == T.offline_tasks(n_train=20, n_test=10, scr_train=10, scr_test=5).digest()
    with pytest.raises(ValueError, match="snippets"):
        T.offline_tasks(n_train=5000)


def test_split_module_separates_docstrings():
    code, docs = T.split_module('"""Module doc."""\nimport os\n\ndef f():\n    """Say\n    hi."""\n    return 1\n')
    assert docs == ["Module doc.", "Say\nhi."]
    assert "import os" in code and "return 1" in code and "Say" not in code


def test_local_files_in_saebench_schema(tmp_path):
    pd = pytest.importorskip("pandas", reason="the hub-schema readers need pandas (aosae[train] installs it with datasets)")
    rows = lambda n, prof, off: [{"hard_text": f"bio {prof} {g} {i + off}", "profession": prof, "gender": g}  # noqa: E731
                                 for prof in prof for g in (0, 1) for i in range(n)]
    d = tmp_path / "bios"
    d.mkdir()
    pd.DataFrame(rows(12, [0, 1, 2, 6, 9, 11, 13, 21, 22, 25, 26], 0)).to_json(d / "train.jsonl", orient="records", lines=True)
    pd.DataFrame(rows(6, [0, 1, 2, 6, 9, 11, 13, 21, 22, 25, 26], 1000)).to_parquet(d / "test.parquet")
    news = tmp_path / "news"
    news.mkdir()
    for split, n in (("train", 10), ("test", 4)):
        pd.DataFrame([{"text": f"{split} news {c} {i}", "label": c} for c in range(4) for i in range(n)]).to_csv(
            news / f"{split}.csv", index=False)
    ts = T.load_task_set(f"LabHC/bias_in_bios_class_set1={d}, fancyzhx/ag_news={news}", train_size=16, test_size=8)
    assert ts.name == "saebench-local" and "SAEBench" in ts.note
    bios = ts.probing[0]
    assert list(bios.train) == ["0", "1", "2", "6", "9"] and all(len(v) == 8 for v in bios.train.values())
    assert all(ts.texts[i].startswith("bio 0 ") for i in bios.train["0"])
    assert sum(ts.texts[i].startswith("bio 0 1 ") for i in bios.train["0"]) == 4  # balanced by gender
    assert [t.name for t in ts.scr][0] == "LabHC/bias_in_bios_class_set1_scr_professor_nurse"
    scr = ts.scr[0]
    assert all(ts.texts[i].startswith("bio 21 0 ") for i in scr.train["biased"])  # male professors
    assert all(ts.texts[i].startswith("bio 13 1 ") for i in scr.train["biased_neg"])  # female nurses
    assert ts.tpp == ["LabHC/bias_in_bios_class_set1"]
    news_task = ts.probing[1]
    assert all(len(v) == 8 for v in news_task.train.values()) and all(len(v) == 4 for v in news_task.test.values())
    with pytest.raises(ValueError, match="not reachable|neither"):
        T.load_task_set("fancyzhx/ag_news")  # no local copy and no hub here (tests run offline)
    with pytest.raises(ValueError, match="unknown SAEBench dataset"):
        T.load_task_set(f"my/dataset={news}")


def test_eval_command_offers_the_probing_options(capsys):
    from aosae.cli import main
    from aosae.eval.evaluate import format_table

    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = capsys.readouterr().out
    for option in ("--probing", "--scr", "--probing-tasks", "--probing-seeds"):
        assert option in text
    table = format_table({"llm_test_accuracy": 0.9, "llm_test_accuracy_ci95": 0.01, "sae_test_accuracy": 0.8,
                          "sae_llm_accuracy_ratio": 0.8 / 0.9, "probing_task_note": T.OFFLINE_NOTE,
                          "probing_seeds": [42], "scr_metric_threshold_2": 0.05})
    assert "0.9 ± 0.01" in table and "not comparable" in table and "scr_metric_threshold_2" in table


def test_local_single_split_files_github_code_europarl_amazon(tmp_path):
    pd = pytest.importorskip("pandas", reason="the hub-schema readers need pandas (aosae[train] installs it with datasets)")
    langs = SAEBENCH_PROBING["codeparrot/github-code"]
    code = tmp_path / "code.jsonl"
    pd.DataFrame([{"code": "#" * 150 + f"{lang} body {i} " + "x" * 600, "language": lang}
                  for i in range(8) for lang in langs]).to_json(code, orient="records", lines=True)
    euro = tmp_path / "europarl.jsonl"
    pd.DataFrame([{"translation": {a: f"{a} sentence {i}", b: f"{b} sentence {i}"}}
                  for i in range(8) for a, b in (("en", "fr"), ("de", "es"), ("nl", "en"))]).to_json(
        euro, orient="records", lines=True)
    amazon = tmp_path / "amazon"
    amazon.mkdir()
    for split in ("train", "test"):
        pd.DataFrame([{"text": f"{split} review {r} {i}", "rating": r, "category": 1}
                      for r in (1.0, 5.0) for i in range(6)]).to_parquet(amazon / f"{split}.parquet")
    ts = T.load_task_set(f"codeparrot/github-code={code},Helsinki-NLP/europarl={euro},"
                         f"canrager/amazon_reviews_mcauley_1and5_sentiment={amazon}", train_size=8, test_size=4)
    gh, ep, am = ts.probing
    assert list(gh.train) == langs and all(len(v) == 4 for v in gh.train.values())
    assert not set(gh.train["C"]) & set(gh.test["C"])
    assert all(ts.texts[i].startswith("Python body") for i in gh.train["Python"])  # 150 header characters skipped
    assert all(ts.texts[i].startswith("de ") for i in ep.train["de"]) and len(ep.test["nl"]) == 2
    assert list(am.train) == ["1.0", "5.0"] and all(ts.texts[i].startswith("train review 5.0") for i in am.train["5.0"])
