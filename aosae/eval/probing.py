"""Sparse probing, SCR and TPP of an SAE on a task set, over several seeds, with intervals.

`ProbingSuite` does the SAE-independent work once: the LM's activations of the task set's texts
(cached on disk, text_activations.py), their per-text means, and for every seed the LM's probes
and accuracies. `suite.evaluate(sae)` then costs one SAE pass over the cached tokens plus the
SAE's probes; every SAE evaluated by one suite (the arms of an ablation) sees the same texts,
LM probes and random draws.

Seeds: each seed re-draws the balanced negatives and re-trains every probe (the texts stay the
same: they are chosen by the task set's data seed). SAEBench runs one seed (42) and chains the
RNG across datasets; here each dataset and SCR pair starts from its seed, so datasets do not
depend on each other. Reported per metric: the mean over seeds, `<metric>_ci95` (half-width of
the 95% Student-t interval of that mean; 0 with one seed) and the per-seed values in the details.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from aosae.eval import scr_tpp as S
from aosae.eval import sparse_probing as P
from aosae.eval.tasks import TaskSet, load_task_set
from aosae.eval.text_activations import TextActivations, cached_activations

DEFAULT_SEEDS = (42, 43, 44)


def t_interval(values: Sequence[float]) -> float:
    """Half-width of the 95% Student-t interval of the mean of `values` (0 for one value)."""
    n = len(values)
    if n < 2:
        return 0.0
    from scipy.stats import t

    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return float(t.ppf(0.975, n - 1) * sd / math.sqrt(n))


def summarise(per_seed: list[dict[str, float]]) -> dict[str, float]:
    """{metric: mean over seeds, metric_ci95: interval} over the metrics every seed has."""
    out = {}
    for k in per_seed[0]:
        vals = [r[k] for r in per_seed if k in r]
        out[k] = sum(vals) / len(vals)
        out[f"{k}_ci95"] = t_interval(vals)
    return out


def _select(pooled: torch.Tensor, groups: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {k: pooled[idx] for k, idx in groups.items()}


@dataclass
class ProbingSuite:
    """The SAE-independent part of the evals on one model, layer and task set (module docstring).

    acts: per-token LM activations of tasks.texts; context: the token budget per text (SAEBench's
    context_length, also the padded length its SCR/TPP ablation assumes)."""
    tasks: TaskSet
    acts: TextActivations
    context: int
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    k_values: tuple[int, ...] = P.K_VALUES
    thresholds: tuple[int, ...] = S.THRESHOLDS
    log: Optional[Callable[[str], None]] = None
    _lm_pooled: Optional[torch.Tensor] = field(default=None, repr=False)
    _probing_lm: dict = field(default_factory=dict, repr=False)
    _scr_lm: dict = field(default_factory=dict, repr=False)
    _tpp_lm: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.acts.n_texts != len(self.tasks.texts):
            raise ValueError(f"{self.acts.n_texts} activation texts for {len(self.tasks.texts)} task texts")
        if not self.seeds:
            raise ValueError("give at least one seed")
        self.seeds = tuple(int(s) for s in self.seeds)

    def _say(self, msg: str) -> None:
        if self.log is not None:
            self.log(msg)

    @property
    def lm_pooled(self) -> torch.Tensor:
        if self._lm_pooled is None:
            self._lm_pooled = self.acts.pooled()
        return self._lm_pooled

    # -- the LM's side, computed once per seed ------------------------------------------------

    def probing_lm(self, seed: int):
        if seed not in self._probing_lm:
            self._say(f"  sparse probing: LM probes, seed {seed}")
            self._probing_lm[seed] = [P.llm_dataset_probing(_select(self.lm_pooled, t.train), _select(self.lm_pooled, t.test),
                                                            self.k_values, seed) for t in self.tasks.probing]
        return self._probing_lm[seed]

    def scr_lm(self, seed: int):
        if seed not in self._scr_lm:
            self._say(f"  SCR: LM probes, seed {seed}")
            self._scr_lm[seed] = [S.train_lm_probes(_select(self.lm_pooled, t.train), _select(self.lm_pooled, t.test),
                                                    scr=True, seed=seed) for t in self.tasks.scr]
        return self._scr_lm[seed]

    def tpp_lm(self, seed: int):
        if seed not in self._tpp_lm:
            self._say(f"  TPP: LM probes, seed {seed}")
            self._tpp_lm[seed] = [S.train_lm_probes(_select(self.lm_pooled, t.train), _select(self.lm_pooled, t.test),
                                                    scr=False, seed=seed) for t in self._tpp_tasks()]
        return self._tpp_lm[seed]

    def _tpp_tasks(self):
        by_name = {t.name: t for t in self.tasks.probing}
        return [by_name[n] for n in self.tasks.tpp]

    # -- one SAE ------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, sae, probing: bool = True, scr: bool = True) -> tuple[dict, dict]:
        """(flat metrics, details) of `sae` (encode, W_dec [d_sae, d_in]); scr=True runs SCR and TPP."""
        d_sae = int(sae.W_dec.shape[0])
        thresholds = tuple(n for n in self.thresholds if n <= d_sae)
        if scr and not thresholds:
            raise ValueError(f"every SCR/TPP threshold {self.thresholds} exceeds the SAE's {d_sae} latents")
        if scr and len(thresholds) < len(self.thresholds):
            self._say(f"  SCR/TPP: thresholds above the SAE's {d_sae} latents left out: "
                      f"{[n for n in self.thresholds if n > d_sae]}")
        self._say(f"  encoding {self.acts.rows.shape[0]} tokens of {self.acts.n_texts} texts with the SAE")
        sae_pooled = self.acts.sae_pooled(sae)
        res = {"probing_task_set": self.tasks.name, "probing_task_note": self.tasks.note,
               "probing_seeds": list(self.seeds), "probing_context": self.context}
        details: dict = {"task_set": self.tasks.name, "note": self.tasks.note, "seeds": list(self.seeds)}
        if probing:
            m, d = self._sparse_probing(sae_pooled)
            res.update(m)
            details["sparse_probing"] = d
        if scr:
            kept = self.acts.offsets.diff().float()
            padded = (self.context - kept).clamp(min=0) / kept
            f_zero = sae.encode(torch.zeros(1, int(sae.W_dec.shape[1]), device=sae.W_dec.device)).float().cpu()[0]
            W_dec = sae.W_dec.detach().float().cpu()
            m, d = self._scr_tpp(sae_pooled, padded, f_zero, W_dec, thresholds)
            res.update(m)
            details["scr_tpp"] = d
        return res, details

    def _sparse_probing(self, sae_pooled):
        per_seed, details = [], {}
        for seed in self.seeds:
            datasets = {}
            for task, (llm, state) in zip(self.tasks.probing, self.probing_lm(seed)):
                sae = P.sae_dataset_probing(_select(sae_pooled, task.train), _select(sae_pooled, task.test),
                                            self.k_values, state)
                per_class = {**llm, **sae}
                datasets[task.name] = {"mean": P.mean_over_classes(per_class), "per_class": per_class}
            overall = S.average([d["mean"] for d in datasets.values()])
            overall["sae_llm_accuracy_ratio"] = overall["sae_test_accuracy"] / overall["llm_test_accuracy"]
            for name, d in datasets.items():
                overall[f"{name}/llm_test_accuracy"] = d["mean"]["llm_test_accuracy"]
                overall[f"{name}/sae_test_accuracy"] = d["mean"]["sae_test_accuracy"]
            per_seed.append(overall)
            details[seed] = datasets
        return summarise(per_seed), details

    def _scr_tpp(self, sae_pooled, padded, f_zero, W_dec, thresholds):
        def side(task):
            return S.SaeSide(train=_select(sae_pooled, task.train), test=_select(sae_pooled, task.test), W_dec=W_dec,
                             padded=_select(padded, task.test), f_zero=f_zero)

        scr_seeds, tpp_seeds, details = [], [], {}
        for seed in self.seeds:
            pairs = {t.name: S.scr_for_pair(lm, _select(self.lm_pooled, t.test), side(t), thresholds)
                     for t, lm in zip(self.tasks.scr, self.scr_lm(seed))} if self.tasks.scr else {}
            tpp = {}
            for t, lm in zip(self._tpp_tasks(), self.tpp_lm(seed)):
                mean, per_class = S.tpp_for_dataset(lm, _select(self.lm_pooled, t.test), side(t), thresholds)
                tpp[t.name] = {"mean": mean, "per_class": per_class}
            if pairs:
                scr_seeds.append(S.average(list(pairs.values())))
            if tpp:
                tpp_seeds.append(S.average([d["mean"] for d in tpp.values()]))
            details[seed] = {"scr": pairs, "tpp": tpp,
                             "lm_clean_accuracies": {"scr": {t.name: lm.clean for t, lm in zip(self.tasks.scr, self.scr_lm(seed))},
                                                     "tpp": {t.name: lm.clean for t, lm in zip(self._tpp_tasks(), self.tpp_lm(seed))}}}
        out = {}
        if scr_seeds:
            out.update(summarise(scr_seeds))
        if tpp_seeds:
            out.update(summarise(tpp_seeds))
        return out, details


SCR_SUMMARY = tuple(f"scr_metric_threshold_{n}" for n in S.THRESHOLDS)
TPP_SUMMARY = tuple(f"tpp_threshold_{n}_total_metric" for n in S.THRESHOLDS)
PROBING_SUMMARY = ("llm_test_accuracy", "sae_test_accuracy", "sae_llm_accuracy_ratio",
                   *(f"llm_top_{k}_test_accuracy" for k in P.K_VALUES), *(f"sae_top_{k}_test_accuracy" for k in P.K_VALUES))


def prepare_suite(model, tokenizer, layer: int, *, model_name: str, tasks: str | TaskSet = "offline", context: int = 128,
                  seeds: Sequence[int] = DEFAULT_SEEDS, lm_batch: int = 16, device: str = "cpu",
                  cache_dir=None, log: Optional[Callable[[str], None]] = None) -> ProbingSuite:
    """A ProbingSuite for `model` at block `layer` on the task set named by `tasks` (see
    tasks.load_task_set) or given as a TaskSet, its activations from the cache or collected into it."""
    task_set = tasks if isinstance(tasks, TaskSet) else load_task_set(tasks, log=log)
    if log is not None:
        log(f"probing: {task_set.note}")
    acts, _ = cached_activations(model, tokenizer, task_set.texts, layer, model_name=model_name,
                                 texts_digest=task_set.digest(), context=context, lm_batch=lm_batch, device=device,
                                 cache_dir=cache_dir, log=log)
    return ProbingSuite(task_set, acts, context, tuple(seeds), log=log)
