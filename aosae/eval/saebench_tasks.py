"""SAEBench's own task sets: its probing, SCR and TPP datasets by hub id, or local copies with the
same columns (a directory with train.* and test.* files), turned into aosae TaskSets.

Used when `aosae eval --probing-tasks` names SAEBench datasets; the offline default lives in
tasks.py. pandas and datasets are imported only here, when asked for.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Optional

from aosae.eval.tasks import SCR_KEYS, ProbingTask, ScrTask, TaskSet, spurious_groups

# SAEBench 0.6.0 (sae_bench_utils/dataset_info.py): the classes it probes per dataset
SAEBENCH_PROBING = {
    "LabHC/bias_in_bios_class_set1": ["0", "1", "2", "6", "9"],
    "LabHC/bias_in_bios_class_set2": ["11", "13", "14", "18", "19"],
    "LabHC/bias_in_bios_class_set3": ["20", "21", "22", "25", "26"],
    "canrager/amazon_reviews_mcauley_1and5": ["1", "2", "3", "5", "6"],
    "canrager/amazon_reviews_mcauley_1and5_sentiment": ["1.0", "5.0"],
    "codeparrot/github-code": ["C", "Python", "HTML", "Java", "PHP"],
    "fancyzhx/ag_news": ["0", "1", "2", "3"],
    "Helsinki-NLP/europarl": ["en", "fr", "de", "es", "nl"],
}
SAEBENCH_TPP = ("LabHC/bias_in_bios_class_set1", "canrager/amazon_reviews_mcauley_1and5")
_PROFESSIONS = ("accountant architect attorney chiropractor comedian composer dentist dietitian dj filmmaker "
                "interior_designer journalist model nurse painter paralegal pastor personal_trainer photographer "
                "physician poet professor psychologist rapper software_engineer surgeon teacher yoga_teacher").split()
_AMAZON = ("All_Beauty Toys_and_Games Cell_Phones_and_Accessories Industrial_and_Scientific Gift_Cards "
           "Musical_Instruments Electronics Handmade_Products Arts_Crafts_and_Sewing Baby_Products Health_and_Household "
           "Office_Products Digital_Music Grocery_and_Gourmet_Food Sports_and_Outdoors Home_and_Kitchen "
           "Subscription_Boxes Tools_and_Home_Improvement Pet_Supplies Video_Games Kindle_Store "
           "Clothing_Shoes_and_Jewelry Patio_Lawn_and_Garden Unknown Books Automotive CDs_and_Vinyl "
           "Beauty_and_Personal_Care Amazon_Fashion Magazine_Subscriptions Software Health_and_Personal_Care "
           "Appliances Movies_and_TV").split()
# dataset -> (text column, column 1 and its value ids, column 2 and its value ids)
_TWO_COLUMN = {
    "LabHC/bias_in_bios": ("hard_text", "profession", {n: i for i, n in enumerate(_PROFESSIONS)},
                           "gender", {"male": 0, "female": 1}),
    "canrager/amazon_reviews_mcauley_1and5": ("text", "category", {n: i for i, n in enumerate(_AMAZON)},
                                              "rating", {1.0: 1.0, 5.0: 5.0}),
}
SAEBENCH_SCR = {
    "LabHC/bias_in_bios_class_set1": ([("professor", "nurse"), ("architect", "journalist"), ("surgeon", "psychologist"),
                                       ("attorney", "teacher")], ("male", "female")),
    "canrager/amazon_reviews_mcauley_1and5": ([("Books", "CDs_and_Vinyl"), ("Software", "Electronics"),
                                               ("Pet_Supplies", "Office_Products"),
                                               ("Industrial_and_Scientific", "Toys_and_Games")], (1.0, 5.0)),
}
SAEBENCH_NOTE = ("task set '{}': SAEBench's datasets ({}); comparable with published SAEBench numbers only at "
                 "SAEBench's sizes (4000 train / 1000 test texts per dataset) and context 128")
_READERS = {".parquet": "read_parquet", ".jsonl": "read_json", ".json": "read_json", ".csv": "read_csv"}


def _read_frame(path: Path):
    import pandas as pd

    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise ValueError(f"{path}: unsupported file type; use one of {sorted(_READERS)}")
    return getattr(pd, reader)(path, lines=True) if path.suffix.lower() == ".jsonl" else getattr(pd, reader)(path)


def _split_file(directory: Path, split: str) -> Optional[Path]:
    found = sorted(p for p in directory.glob(f"{split}*") if p.suffix.lower() in _READERS)
    return found[0] if found else None


def load_frames(dataset: str, local: Optional[str]):
    """(train, test) pandas frames of a SAEBench dataset: from `local` (a directory holding
    train.* and test.* files, .parquet/.jsonl/.json/.csv, with the hub dataset's columns) or the hub.
    test is None for datasets that have only a train split (github-code, europarl)."""
    if local is not None:
        path = Path(local)
        if path.is_file():
            return _read_frame(path), None
        if not path.is_dir():
            raise ValueError(f"{local} is neither a file nor a directory (for {dataset}: a directory with train.* and "
                             "test.* files in the hub dataset's columns)")
        train, test = _split_file(path, "train"), _split_file(path, "test")
        if train is None:
            raise ValueError(f"{local} has no train.parquet/.jsonl/.json/.csv file for {dataset}")
        return _read_frame(train), (_read_frame(test) if test is not None else None)
    from aosae.machine import hub_offline, hub_reachable

    if hub_offline("DATASETS") or not hub_reachable():
        raise ValueError(f"dataset {dataset!r} needs the Hugging Face hub, which is not reachable here: pass a local "
                         f"copy as {dataset}=DIR (train.* and test.* files with the same columns) or use the offline "
                         "task set")
    import datasets
    import pandas as pd

    if dataset == "codeparrot/github-code":
        rows = datasets.load_dataset(dataset, streaming=True, split="train", trust_remote_code=True,
                                     languages=SAEBENCH_PROBING[dataset])
        return rows, None  # an iterable: read lazily (the dataset is 1 TB)
    if dataset == "Helsinki-NLP/europarl":
        pairs = {"en": "en-fr", "fr": "fr-it", "de": "de-en", "es": "es-fr", "nl": "nl-pt"}
        return {lang: datasets.load_dataset(dataset, pair, streaming=True, split="train") for lang, pair in pairs.items()}, None
    ds = datasets.load_dataset(dataset)
    return pd.DataFrame(ds["train"]), pd.DataFrame(ds["test"])


def _balanced_by_column2(df, text_col: str, col1: str, col2: str, classes, per_quadrant: int, seed: int) -> dict:
    """Per class of column 1: per_quadrant texts of each column-2 value (SAEBench's get_balanced_dataset)."""
    out = {}
    for cls in classes:
        sub = df[df[col1].astype(str) == cls]  # SAEBench keys classes by str(value)
        groups = list(sub.groupby(col2))
        if len(groups) < 2 or min(len(g) for _, g in groups) < per_quadrant:
            raise ValueError(f"class {cls} has fewer than {per_quadrant} texts per {col2} value; ask for fewer texts")
        out[cls] = [t for _, g in groups for t in g.sample(n=per_quadrant, random_state=seed)[text_col].tolist()]
    return out


def _per_class(df, text_col: str, label_col: str, classes, n: int, seed: int) -> dict:
    out = {}
    for cls in classes:
        sub = df[df[label_col].astype(str) == cls]
        if len(sub) < n:
            raise ValueError(f"class {cls} of column {label_col} has {len(sub)} texts, {n} needed; ask for fewer texts")
        out[cls] = sub.sample(n=n, random_state=seed)[text_col].tolist()
    return out


def _from_stream(rows, label, text, classes, n_total, keep=lambda s: True, edit=lambda s: s) -> dict:
    """Texts per class from a stream until every class has n_total (classes filled early keep
    growing meanwhile, as in SAEBench, so a seed shuffles the same lists)."""
    got = {c: [] for c in classes}
    for row in rows:
        c = label(row)
        if c in got and keep(text(row)):
            got[c].append(edit(text(row)))
        if all(len(v) >= n_total for v in got.values()):
            break
    return got


def saebench_probing_texts(dataset: str, local: Optional[str], train_size: int, test_size: int, seed: int):
    """(train, test) class -> texts of one SAEBench sparse-probing dataset, sampled as SAEBench does."""
    classes = SAEBENCH_PROBING[dataset]
    train_df, test_df = load_frames(dataset.split("_class_set")[0].removesuffix("_sentiment")
                                    if "bias_in_bios" in dataset or "amazon" in dataset else dataset, local)
    if "bias_in_bios" in dataset or dataset == "canrager/amazon_reviews_mcauley_1and5":
        text_col, col1, _, col2, _ = _TWO_COLUMN[dataset.split("_class_set")[0]]
        return (_balanced_by_column2(train_df, text_col, col1, col2, classes, train_size // 4, seed),
                _balanced_by_column2(test_df, text_col, col1, col2, classes, test_size // 4, seed))
    if dataset.endswith("_sentiment"):
        return (_per_class(train_df, "text", "rating", classes, train_size // 2, seed),
                _per_class(test_df, "text", "rating", classes, test_size // 2, seed))
    if dataset == "fancyzhx/ag_news":
        return (_per_class(train_df, "text", "label", classes, train_size // 2, seed),
                _per_class(test_df, "text", "label", classes, test_size // 2, seed))
    n_tr, n_te = train_size // 2, test_size // 2
    if dataset == "codeparrot/github-code":
        rows = train_df.to_dict("records") if hasattr(train_df, "to_dict") else train_df
        # SAEBench skips ~50 tokens (150 characters) of licence header and keeps code longer than 128·3 + 150 characters
        got = _from_stream(rows, lambda r: r["language"], lambda r: r["code"], classes, n_tr + n_te + 1,
                           keep=lambda s: len(s) > 128 * 3 + 150, edit=lambda s: s[150:])
    elif dataset == "Helsinki-NLP/europarl":
        if isinstance(train_df, dict):
            got = {lang: [r["translation"][lang] for _, r in zip(range(n_tr + n_te + 1), rows)]
                   for lang, rows in train_df.items() if lang in classes}
        else:
            got = {lang: [t[lang] for t in train_df["translation"] if lang in t][: n_tr + n_te + 1] for lang in classes}
    else:
        raise ValueError(f"unknown SAEBench dataset {dataset!r}; known: {sorted(SAEBENCH_PROBING)}")
    rng = random.Random(seed)
    train, test = {}, {}
    for c in classes:
        texts = list(got[c])
        if len(texts) < n_tr + n_te:
            raise ValueError(f"{dataset}: class {c} has {len(texts)} texts, {n_tr + n_te} needed; ask for fewer texts")
        rng.shuffle(texts)
        train[c], test[c] = texts[:n_tr], texts[n_tr : n_tr + n_te]
    return train, test


def saebench_scr_texts(dataset: str, local: Optional[str], pair: tuple[str, str], train_size: int, test_size: int,
                       seed: int):
    """(train, test) SCR groups (SCR_KEYS -> texts) for one column-1 pair of a SAEBench SCR dataset."""
    base = dataset.split("_class_set")[0]
    text_col, col1, map1, col2, map2 = _TWO_COLUMN[base]
    column2 = SAEBENCH_SCR[dataset][1]
    out = []
    for df, size in zip(load_frames(base, local), (train_size, test_size)):
        if df is None:
            raise ValueError(f"{dataset} needs a test split: give a directory with train.* and test.* files")
        quadrant = {(a, b): df[(df[col1] == map1[a]) & (df[col2] == map2[b])][text_col].tolist()
                    for a in pair for b in column2}
        out.append(spurious_groups(quadrant, pair, column2, size // 4, seed))
    return out[0], out[1]


def saebench_tasks(entries: list[tuple[str, Optional[str]]], train_size: int = 4000, test_size: int = 1000,
                   seed: int = 42, log=None) -> TaskSet:
    """SAEBench's datasets, each from the hub (local None) or from a local copy."""
    ts = TaskSet(name="saebench" if all(p is None for _, p in entries) else "saebench-local",
                 note="")
    for dataset, local in entries:
        if dataset not in SAEBENCH_PROBING:
            raise ValueError(f"unknown SAEBench dataset {dataset!r}; known: {sorted(SAEBENCH_PROBING)}")
        if log is not None:
            log(f"probing: loading {dataset} from {local or 'the hub'}")
        train, test = saebench_probing_texts(dataset, local, train_size, test_size, seed)
        ts.probing.append(ProbingTask(dataset, {c: ts.add(v) for c, v in train.items()},
                                      {c: ts.add(v) for c, v in test.items()}))
        if dataset in SAEBENCH_TPP:
            ts.tpp.append(dataset)
        if dataset in SAEBENCH_SCR:
            pairs, column2 = SAEBENCH_SCR[dataset]
            for pair in pairs:
                tr, te = saebench_scr_texts(dataset, local, pair, train_size, test_size, seed)
                ts.scr.append(ScrTask(f"{dataset}_scr_{pair[0]}_{pair[1]}", pair, column2,
                                      {k: ts.add(v) for k, v in tr.items()}, {k: ts.add(v) for k, v in te.items()}))
    ts.note = SAEBENCH_NOTE.format(ts.name, ", ".join(f"{d}{'=' + p if p else ''}" for d, p in entries))
    return ts
