"""Sparse probing with SAEBench's definitions (sae_bench/evals/sparse_probing, v0.6.0).

Inputs are mean-pooled activations per text (BOS/PAD/EOS positions dropped, the rest averaged:
text_activations.py), grouped by class. For every class of a dataset:

1. one-vs-rest data, balanced: the class's texts are the positives; as many negatives are
   drawn from the other classes, ceil(n_pos / n_other_classes) from each, then n_pos of those
   (`one_vs_rest`, which makes SAEBench's random draws in its order, so a seed picks the same
   texts as SAEBench's prepare_probe_data);
2. probes over all dimensions (`llm_test_accuracy` on the LM's activations, `sae_test_accuracy`
   on the SAE's latents): a torch logistic regression (nn.Linear → BCE-with-logits, AdamW lr 1e-2,
   batch 250, up to 100 epochs, early stop after 10 epochs without a better test accuracy,
   the best test accuracy reported), as SAEBench's train_probe_gpu;
3. top-k probes (`llm_top_{k}_test_accuracy`, `sae_top_{k}_test_accuracy`): the k dimensions with
   the largest |mean over positives − mean over negatives| on the training set, then
   scikit-learn's LogisticRegression (L2, C = 1, max_iter 1000), as SAEBench's train_sklearn_probe.

Accuracies are averaged over the classes of a dataset, then over datasets. SAEBench's default
k ∈ {1, 2, 5}; this module also reports 10, 20 and 50.

The ratio reported beside them, `sae_llm_accuracy_ratio` = sae_test_accuracy / llm_test_accuracy.
The paper's "maintains 93.99% of the model's accuracy (baseline 95.19%)" reads as SAEBench's
sae_test_accuracy = 0.9399 against llm_test_accuracy = 0.9519 (a ratio of 0.987); both are
reported, so either reading can be compared.
"""
from __future__ import annotations

import copy
import functools
import math
import random
from contextlib import contextmanager, nullcontext
from typing import Optional, Sequence

import torch
from torch import nn

K_VALUES = (1, 2, 5, 10, 20, 50)
SAEBENCH_K_VALUES = (1, 2, 5)
POSITIVE, NEGATIVE = 1, 0


@contextmanager
def one_thread():
    """Probes are tiny tensors: with more than one OpenMP thread each op pays a thread barrier,
    which on a busy 2-core machine costs ~20 ms per op (measured: BCE-with-logits on 16 values,
    24 ms with 2 threads, 0.01 ms with 1). Results do not depend on it."""
    try:
        from threadpoolctl import threadpool_limits  # scikit-learn's dependency: the BLAS under its lbfgs
    except ImportError:
        threadpool_limits = None
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1) if threadpool_limits is not None else nullcontext():
            yield
    finally:
        torch.set_num_threads(n)


def single_threaded(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with one_thread():
            return fn(*args, **kwargs)
    return wrapper


def one_vs_rest(acts: dict[str, torch.Tensor], cls: str, paired: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced binary data for class `cls`: ([2·n_pos, d] shuffled, labels [2·n_pos] int32, 1 = cls).

    Negatives: texts of `paired` when given (SCR's paired groups), else drawn from every other
    class. Uses torch's global RNG in SAEBench's order (per negative class a permutation, then one
    over the pooled negatives, then one to shuffle)."""
    pos = acts[cls]
    n_pos = pos.shape[0]
    if paired is not None:
        neg = acts[paired]
    else:
        others = [k for k in acts if k != cls]
        if not others:
            raise ValueError(f"one-vs-rest needs at least two classes, got only {cls!r}")
        per_class = math.ceil(n_pos / len(others))
        neg = torch.cat([acts[k][torch.randperm(acts[k].shape[0])[:per_class]] for k in others])
    neg = neg[torch.randperm(neg.shape[0])[:n_pos]]
    if neg.shape != pos.shape:
        raise ValueError(f"class {cls!r} has {n_pos} texts but only {neg.shape[0]} negatives could be drawn: "
                         "give every class at least as many texts in total across the other classes")
    x = torch.cat([pos, neg])
    y = torch.empty(x.shape[0], dtype=torch.int32)
    y[:n_pos], y[n_pos:] = POSITIVE, NEGATIVE
    order = torch.randperm(x.shape[0])
    return x[order], y[order]


def top_k_dims(x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (ascending) of the k dimensions with the largest |mean(x | y=1) − mean(x | y=0)|."""
    diff = (x[y == POSITIVE].mean(0) - x[y == NEGATIVE].mean(0)).abs()
    chosen = torch.zeros(x.shape[1], dtype=torch.bool)
    chosen[torch.argsort(diff, descending=True)[:k]] = True
    return chosen.nonzero().squeeze(1)


def probe_accuracy(probe: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((probe(x).squeeze(-1) > 0).long() == y).float().mean())


@single_threaded
def train_linear_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, *,
                       batch_size: int, epochs: int, lr: float, patience: int, l1: Optional[float] = None
                       ) -> tuple[nn.Linear, float]:
    """A logistic-regression probe trained with AdamW on BCE-with-logits (+ l1·Σ|w|): SAEBench's
    train_probe_gpu. Returns the probe of the epoch with the best test accuracy, and that accuracy.

    x_*: [n, d] float; y_*: [n] int (0/1)."""
    with torch.enable_grad():
        probe = nn.Linear(x_train.shape[1], 1, dtype=x_train.dtype)
        opt = torch.optim.AdamW(probe.parameters(), lr=lr)
        loss_fn = nn.BCEWithLogitsLoss()
        best, best_acc, stale = None, 0.0, 0
        for _ in range(epochs):
            order = torch.randperm(x_train.shape[0])
            for s in range(0, x_train.shape[0], batch_size):
                idx = order[s : s + batch_size]
                loss = loss_fn(probe(x_train[idx]).squeeze(-1), y_train[idx].to(x_train.dtype))
                if l1 is not None:
                    loss = loss + l1 * probe.weight.abs().sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
            acc = probe_accuracy(probe, x_test, y_test)
            if best is None or acc > best_acc:
                best, best_acc, stale = copy.deepcopy(probe), acc, 0
            else:
                stale += 1
            if stale >= patience:
                break
    return best, best_acc


def sklearn_probe_accuracy(x_train, y_train, x_test, y_test) -> float:
    """Test accuracy of scikit-learn's L2 logistic regression (C = 1, max_iter 1000): SAEBench's top-k probe."""
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError as err:
        raise ImportError("sparse probing needs scikit-learn: pip install scikit-learn (or aosae[eval])") from err
    with one_thread():
        clf = LogisticRegression(C=1.0, max_iter=1000)
        clf.fit(x_train.float().numpy(), y_train.numpy())
        return float((clf.predict(x_test.float().numpy()) == y_test.numpy()).mean())


@single_threaded
def class_accuracies(train: dict[str, torch.Tensor], test: dict[str, torch.Tensor], k: Optional[int]) -> dict[str, float]:
    """Per class: the one-vs-rest probe's test accuracy, on all dimensions (k None: torch probe)
    or on the top-k dimensions (scikit-learn). SAEBench's train_probe_on_activations."""
    out = {}
    for cls in train:
        x_tr, y_tr = one_vs_rest(train, cls)
        x_te, y_te = one_vs_rest(test, cls)
        if k is None:
            _, out[cls] = train_linear_probe(x_tr, y_tr, x_te, y_te, batch_size=250, epochs=100, lr=1e-2, patience=10)
        else:
            dims = top_k_dims(x_tr, y_tr, k)
            out[cls] = sklearn_probe_accuracy(x_tr[:, dims], y_tr, x_te[:, dims], y_te)
    return out


def _mean(d: dict[str, float]) -> float:
    return sum(d.values()) / len(d)


def llm_probing(train: dict[str, torch.Tensor], test: dict[str, torch.Tensor], k_values: Sequence[int]) -> dict[str, dict[str, float]]:
    """Per-class LLM accuracies: {'llm_test_accuracy': {cls: acc}, 'llm_top_{k}_test_accuracy': ...}."""
    res = {"llm_test_accuracy": class_accuracies(train, test, None)}
    for k in k_values:
        res[f"llm_top_{k}_test_accuracy"] = class_accuracies(train, test, k)
    return res


def sae_probing(train: dict[str, torch.Tensor], test: dict[str, torch.Tensor], k_values: Sequence[int]) -> dict[str, dict[str, float]]:
    res = {"sae_test_accuracy": class_accuracies(train, test, None)}
    for k in k_values:
        res[f"sae_top_{k}_test_accuracy"] = class_accuracies(train, test, k)
    return res


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> tuple:
    return torch.get_rng_state(), random.getstate()


def set_rng_state(state: tuple) -> None:
    torch.set_rng_state(state[0])
    random.setstate(state[1])


def dataset_probing(llm_train: dict[str, torch.Tensor], llm_test: dict[str, torch.Tensor],
                    sae_train: dict[str, torch.Tensor], sae_test: dict[str, torch.Tensor],
                    k_values: Sequence[int] = K_VALUES, seed: Optional[int] = 42) -> tuple[dict, dict]:
    """One dataset, one seed, in SAEBench's order (LLM probes, LLM top-k, SAE probes, SAE top-k).

    Args: pooled activations per class, [n_texts, d_model] (llm_*) and [n_texts, d_sae] (sae_*),
        float32; seed: seeds torch and random first (None: leave the RNG as it is).
    Returns (means over classes {metric: float}, per class {metric: {class: float}})."""
    llm, state = llm_dataset_probing(llm_train, llm_test, k_values, seed)
    sae = sae_dataset_probing(sae_train, sae_test, k_values, state)
    per_class = {**llm, **sae}
    return {m: _mean(v) for m, v in per_class.items()}, per_class


def llm_dataset_probing(llm_train: dict[str, torch.Tensor], llm_test: dict[str, torch.Tensor],
                        k_values: Sequence[int] = K_VALUES, seed: Optional[int] = 42) -> tuple[dict, tuple]:
    """The LM's half of dataset_probing: (per-class results, the RNG state after it). The LM's
    results do not depend on the SAE: compute them once and start every SAE from that state."""
    if set(llm_train) != set(llm_test):
        raise ValueError(f"train and test must have the same classes, got {sorted(llm_train)} and {sorted(llm_test)}")
    if seed is not None:
        seed_everything(seed)
    res = llm_probing(llm_train, llm_test, k_values)
    return res, rng_state()


def sae_dataset_probing(sae_train: dict[str, torch.Tensor], sae_test: dict[str, torch.Tensor],
                        k_values: Sequence[int], state: Optional[tuple]) -> dict:
    """The SAE's half of dataset_probing, starting from the RNG state the LM's half left."""
    if set(sae_train) != set(sae_test):
        raise ValueError(f"train and test must have the same classes, got {sorted(sae_train)} and {sorted(sae_test)}")
    if state is not None:
        set_rng_state(state)
    return sae_probing(sae_train, sae_test, k_values)


def mean_over_classes(per_class: dict[str, dict[str, float]]) -> dict[str, float]:
    return {m: _mean(v) for m, v in per_class.items()}
