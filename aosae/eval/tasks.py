"""Task sets for sparse probing, SCR and TPP: labelled texts, in SAEBench's shapes.

A `TaskSet` holds its unique texts once (their LM activations are cached once, see
text_activations.py) and tasks that refer to them by index:

  ProbingTask  class name -> text indices, train and test (SAEBench's sparse_probing datasets:
               every class becomes a one-vs-rest binary task; TPP uses the same datasets)
  ScrTask      SAEBench's six SCR groups (scr_and_tpp/dataset_creation.py), named here by role:
                 target / target_neg       column 1 (bias_in_bios: profession, professor vs nurse),
                                           both values of column 2 in each
                 spurious / spurious_neg   column 2 (bias_in_bios: gender), both values of column 1
                 biased / biased_neg       column1-pos ∧ column2-pos vs column1-neg ∧ column2-neg: a
                                           training set where the two concepts always agree
               SAEBENCH_SCR_KEYS gives SAEBench's names for them.

Two sources:
  "offline" (default): built from text every Python install has, the standard library's own
      modules. Module families (asyncio, email, http, logging, xml, importlib) give the classes;
      each module is split into its code and its docstrings (prose). Probing datasets: the family
      of a code snippet, the family of a docstring snippet, and code vs English prose (pydoc
      topics). SCR: family pairs (target) with code-vs-docstring as the spurious attribute.
      Numbers on this set are NOT comparable with published SAEBench numbers.
  SAEBench's datasets by hub id (see saebench_tasks), or local files with the same columns.
"""
from __future__ import annotations

import ast
import hashlib
import inspect
import random
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

SCR_PAIRS = {"spurious": "spurious_neg", "target": "target_neg", "biased": "biased_neg"}
SCR_KEYS = ("spurious", "spurious_neg", "target", "target_neg", "biased", "biased_neg")
# SAEBench's (bias_in_bios-flavoured) names of the same groups, in its insertion order
SAEBENCH_SCR_KEYS = {
    "spurious": "male / female", "spurious_neg": "female_data_only",
    "target": "professor / nurse", "target_neg": "nurse_data_only",
    "biased": "male_professor / female_nurse", "biased_neg": "female_nurse_data_only",
}

OFFLINE_FAMILIES = {
    "asyncio": ("asyncio",),
    "email": ("email",),
    "http": ("http", "urllib", "wsgiref", "xmlrpc"),
    "logging": ("logging",),
    "xml": ("xml",),
    "importlib": ("importlib",),
}
OFFLINE_PROBING_FAMILIES = ("asyncio", "email", "http", "logging", "xml")
OFFLINE_SCR_PAIRS = (("asyncio", "email"), ("http", "logging"), ("xml", "importlib"))
OFFLINE_SCR_COLUMN2 = ("code", "docstring")
TEST_FRACTION = 0.3  # of each family's snippets, held out for test sets (docstrings are the scarce ones)
OFFLINE_NOTE = ("task set 'offline': labelled snippets of the Python standard library (module families, code vs "
                "docstrings, code vs pydoc prose); not comparable with published SAEBench numbers, which use "
                "bias_in_bios, amazon reviews, ag_news, github-code and europarl")


@dataclass
class ProbingTask:
    """A multi-class dataset: class name -> indices into TaskSet.texts, for train and test."""
    name: str
    train: dict[str, list[int]]
    test: dict[str, list[int]]


@dataclass
class ScrTask:
    """An SCR dataset: SCR_KEYS -> indices into TaskSet.texts, for train and test."""
    name: str
    column1: tuple[str, str]
    column2: tuple[str, str]
    train: dict[str, list[int]]
    test: dict[str, list[int]]


@dataclass
class TaskSet:
    name: str
    note: str
    texts: list[str] = field(default_factory=list)
    probing: list[ProbingTask] = field(default_factory=list)
    scr: list[ScrTask] = field(default_factory=list)
    tpp: list[str] = field(default_factory=list)  # names of probing tasks TPP runs on
    _index: dict[str, int] = field(default_factory=dict, repr=False)

    def add(self, texts: list[str]) -> list[int]:
        """Indices of `texts` in self.texts (each unique text stored once)."""
        out = []
        for t in texts:
            if t not in self._index:
                self._index[t] = len(self.texts)
                self.texts.append(t)
            out.append(self._index[t])
        return out

    def digest(self) -> str:
        """A hash of the texts, in order: the activation cache's key."""
        h = hashlib.sha256()
        for t in self.texts:
            h.update(t.encode("utf-8", "surrogatepass"))
            h.update(b"\0")
        return h.hexdigest()[:20]


# ---------------------------------------------------------------------------------------------
# offline: the Python standard library
# ---------------------------------------------------------------------------------------------

def _docstring_nodes(tree: ast.Module):
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)):
                yield first


def split_module(source: str) -> tuple[str, list[str]]:
    """(the code without its docstrings, the docstrings cleaned with inspect.cleandoc)."""
    tree = ast.parse(source)
    doc_lines: set[int] = set()
    docs = []
    for node in _docstring_nodes(tree):
        docs.append(inspect.cleandoc(node.value.value))
        doc_lines.update(range(node.lineno, node.end_lineno + 1))
    code = "\n".join(line for i, line in enumerate(source.splitlines(), 1) if i not in doc_lines)
    return code, docs


def chunk_lines(text: str, size: int, min_size: int) -> list[str]:
    """Consecutive lines joined until a chunk reaches `size` characters; shorter leftovers
    (< min_size) are dropped. Blank-line runs collapse to one blank line."""
    chunks, cur, n = [], [], 0
    for line in text.splitlines():
        if not line.strip() and (not cur or not cur[-1].strip()):
            continue
        cur.append(line.rstrip())
        n += len(line) + 1
        if n >= size:
            chunks.append("\n".join(cur).strip())
            cur, n = [], 0
    if cur and n >= min_size:
        chunks.append("\n".join(cur).strip())
    return [c for c in chunks if len(c) >= min_size]


def stdlib_family_chunks(family: str, size: int = 240, min_size: int = 100) -> tuple[list[str], list[str]]:
    """(code chunks, docstring chunks) of one module family of this Python's standard library."""
    root = Path(sysconfig.get_paths()["stdlib"])
    code_chunks, doc_chunks = [], []
    for package in OFFLINE_FAMILIES[family]:
        for path in sorted((root / package).rglob("*.py")):
            if any(part in ("test", "tests") for part in path.relative_to(root).parts):
                continue
            try:
                code, docs = split_module(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, SyntaxError):
                continue
            code_chunks += chunk_lines(code, size, min_size)
            doc_chunks += chunk_lines("\n\n".join(docs), size, min_size)
    return code_chunks, doc_chunks


def pydoc_prose_chunks(size: int = 240, min_size: int = 100) -> list[str]:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return [c for k in sorted(topics) for c in chunk_lines(topics[k], size, min_size)]


def _split_pool(chunks: list[str], rng: random.Random, test_fraction: float) -> tuple[list[str], list[str]]:
    chunks = list(chunks)
    rng.shuffle(chunks)
    n_test = int(round(len(chunks) * test_fraction))
    return chunks[n_test:], chunks[:n_test]


def _take(pool: list[str], n: int, what: str) -> list[str]:
    if len(pool) < n:
        raise ValueError(f"the offline task set has only {len(pool)} {what} snippets, {n} were asked for: "
                         f"lower the number of texts per class")
    return pool[:n]


def offline_tasks(n_train: int = 100, n_test: int = 40, scr_train: int = 50, scr_test: int = 20,
                  seed: int = 42) -> TaskSet:
    """The offline default task set (module docstring).

    Args:
        n_train, n_test: texts per class for the sparse-probing and TPP datasets (SAEBench: 4000 / 1000
            per dataset, ~2000 / 500 per class).
        scr_train, scr_test: texts per quadrant (column1 value × column2 value) for SCR, so each
            SCR group holds 2 × that many (SAEBench: 1000 / 250).
        seed: the data seed: which snippets land in train and test (SAEBench's random_seed, 42).
    """
    for name, v in (("n_train", n_train), ("n_test", n_test), ("scr_train", scr_train), ("scr_test", scr_test)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 2:
            raise ValueError(f"{name} must be an int >= 2, got {v!r}")
    rng = random.Random(seed)
    ts = TaskSet(name="offline", note=OFFLINE_NOTE)
    pools = {}  # family -> kind -> (train pool, test pool)
    for fam in OFFLINE_FAMILIES:
        code, docs = stdlib_family_chunks(fam)
        pools[fam] = {"code": _split_pool(code, rng, TEST_FRACTION), "docstring": _split_pool(docs, rng, TEST_FRACTION)}

    def probing(name: str, kind: str, families) -> ProbingTask:
        train = {f: ts.add(_take(pools[f][kind][0], n_train, f"{f} {kind} train")) for f in families}
        test = {f: ts.add(_take(pools[f][kind][1], n_test, f"{f} {kind} test")) for f in families}
        return ProbingTask(name, train, test)

    ts.probing.append(probing("stdlib_module_family_code", "code", OFFLINE_PROBING_FAMILIES))
    ts.probing.append(probing("stdlib_module_family_docstring", "docstring", OFFLINE_PROBING_FAMILIES))
    prose_train, prose_test = _split_pool(pydoc_prose_chunks(), rng, TEST_FRACTION)
    code_train = [c for f in OFFLINE_PROBING_FAMILIES for c in pools[f]["code"][0][n_train:]]
    code_test = [c for f in OFFLINE_PROBING_FAMILIES for c in pools[f]["code"][1][n_test:]]
    rng.shuffle(code_train)
    rng.shuffle(code_test)
    ts.probing.append(ProbingTask(
        "stdlib_code_vs_prose",
        {"python_code": ts.add(_take(code_train, n_train, "code train")),
         "english_prose": ts.add(_take(prose_train, n_train, "pydoc prose train"))},
        {"python_code": ts.add(_take(code_test, n_test, "code test")),
         "english_prose": ts.add(_take(prose_test, n_test, "pydoc prose test"))}))
    ts.tpp = ["stdlib_module_family_code", "stdlib_module_family_docstring"]

    for c1 in OFFLINE_SCR_PAIRS:
        groups = {}
        for split, q in ((0, scr_train), (1, scr_test)):
            quadrant = {(a, b): pools[a][b][split] for a in c1 for b in OFFLINE_SCR_COLUMN2}
            groups[split] = spurious_groups(quadrant, c1, OFFLINE_SCR_COLUMN2, q, seed)
        ts.scr.append(ScrTask(f"stdlib_{c1[0]}_{c1[1]}_x_code_docstring", c1, OFFLINE_SCR_COLUMN2,
                              {k: ts.add(v) for k, v in groups[0].items()},
                              {k: ts.add(v) for k, v in groups[1].items()}))
    return ts


def spurious_groups(quadrant: dict[tuple, list[str]], column1: tuple, column2: tuple, per_quadrant: int,
                    seed: int) -> dict[str, list[str]]:
    """SAEBench's six SCR groups from the four quadrants (column1 value, column2 value) -> texts.

    As in SAEBench (get_spurious_corr_data): each group has 2 × per_quadrant texts; `target`
    mixes both column2 values, `spurious` both column1 values, `biased` only the agreeing
    quadrants (so those two quadrants need 2 × per_quadrant texts each)."""
    (p1, n1), (p2, n2) = column1, column2
    pp, pn, np_, nn = (quadrant[(p1, p2)], quadrant[(p1, n2)], quadrant[(n1, p2)], quadrant[(n1, n2)])
    q = per_quadrant
    for (a, b), texts in quadrant.items():
        need = 2 * q if (a, b) in ((p1, p2), (n1, n2)) else q
        if len(texts) < need:
            raise ValueError(f"SCR needs {need} texts that are both {a!r} and {b!r}, "
                             f"found {len(texts)}: lower the SCR texts per quadrant")
    import numpy as np

    rng = np.random.default_rng(seed)
    groups = {
        "spurious": pp[:q] + np_[:q], "spurious_neg": pn[:q] + nn[:q],
        "target": pp[:q] + pn[:q], "target_neg": np_[:q] + nn[:q],
        "biased": pp[: 2 * q], "biased_neg": nn[: 2 * q],
    }
    for k in SCR_KEYS:
        rng.shuffle(groups[k])
    return groups


# ---------------------------------------------------------------------------------------------
# SAEBench's datasets: by hub id, or local files with the same columns
# ---------------------------------------------------------------------------------------------

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


def load_task_set(spec: str = "offline", log=None, **sizes) -> TaskSet:
    """A task set by name: "offline" (default, no network), "saebench" (SAEBench's 8 datasets from
    the hub), or a comma-separated list of SAEBench dataset ids, each optionally `=LOCAL_DIR`
    (a directory with train.* and test.* files with the hub dataset's columns)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"the task set must be 'offline', 'saebench' or SAEBench dataset ids, got {spec!r}")
    if spec == "offline":
        return offline_tasks(**sizes)
    entries = ([(d, None) for d in SAEBENCH_PROBING] if spec == "saebench"
               else [(e.split("=", 1)[0].strip(), e.split("=", 1)[1].strip() if "=" in e else None)
                     for e in spec.split(",") if e.strip()])
    return saebench_tasks(entries, log=log, **sizes)
