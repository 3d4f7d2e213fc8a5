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
  SAEBench's datasets by hub id, or local files with the same columns: saebench_tasks.py.
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


def load_task_set(spec: str = "offline", log=None, **sizes) -> TaskSet:
    """A task set by name: "offline" (default, no network), "saebench" (SAEBench's 8 datasets from
    the hub), or a comma-separated list of SAEBench dataset ids, each optionally `=LOCAL_DIR`
    (a directory with train.* and test.* files with the hub dataset's columns)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"the task set must be 'offline', 'saebench' or SAEBench dataset ids, got {spec!r}")
    if spec == "offline":
        return offline_tasks(**sizes)
    from aosae.eval.saebench_tasks import SAEBENCH_PROBING, saebench_tasks  # pandas/datasets: only when asked

    entries = ([(d, None) for d in SAEBENCH_PROBING] if spec == "saebench"
               else [(e.split("=", 1)[0].strip(), e.split("=", 1)[1].strip() if "=" in e else None)
                     for e in spec.split(",") if e.strip()])
    return saebench_tasks(entries, log=log, **sizes)
