"""The ablation's data: activations to train on, a held-out set, and its ground truth if any.

    synthetic  the project's generator (aosae.data.synthetic): correlated groups and
               parent/child hierarchies with mutually exclusive children
    saelens    SAELens's own generator (sae_lens.synthetic, SynthSAEBench-style): Zipfian
               firing, mutually exclusive children, a bias; ground truth nobody here wrote
    model      cached residual activations of a language model (no ground truth)
"""
from __future__ import annotations

from typing import Optional

import torch

from aosae.data import synthetic as S
from aosae.eval.probing import SCR_SUMMARY, TPP_SUMMARY
from aosae.eval.sparse_probing import K_VALUES

DATASETS = ("synthetic", "saelens", "model")


def load(kind: str, *, samples: int = 40_000, held: int = 8_000, d: int = 64, features: int = 128,
         model: Optional[str] = None, layer: Optional[int] = None, tokens: int = 60_000, lm_tokens: int = 1024,
         probing: bool = False, probing_tasks: str = "offline", probing_seeds: tuple = (42, 43)):
    """(train activations [N, d], held-out activations [M, d], SyntheticData of the held-out
    set or None, a description dict, an LM scorer (sae -> KL/CE scores, plus SAEBench's sparse
    probing and SCR/TPP on `probing_tasks` over `probing_seeds` when `probing`) or None)."""
    if kind == "synthetic":
        cfg = S.SyntheticConfig(d=d, n_features=features, firing_prob=0.03, correlation=0.3, n_parents=8)
        train, truth = S.generate(cfg, samples, seed=0), S.generate(cfg, held, seed=1)
        desc = (f"aosae.data.synthetic: d={d}, {features} features ({cfg.n_hierarchy} in {cfg.n_parents} parent/"
                f"{cfg.children_per_parent}-children hierarchies), firing prob {cfg.firing_prob}, correlation "
                f"{cfg.correlation} in groups of {cfg.correlation_group}, {cfg.magnitude} magnitudes")
    elif kind == "saelens":
        cfg = S.SAELensSyntheticConfig(d=d, n_features=features)
        gen = S.saelens_model(cfg)
        train, truth = S.generate_saelens(cfg, samples, seed=0, model=gen), S.generate_saelens(cfg, held, seed=1, model=gen)
        desc = (f"sae_lens.synthetic.SyntheticModel: d={d}, {features} features, Zipfian firing "
                f"[{cfg.min_prob}, {cfg.max_prob}], {cfg.n_parents} roots × {cfg.children_per_parent} mutually "
                f"exclusive children (compensated probabilities), bias norm 1")
    elif kind == "model":
        from aosae.training.config import TrainConfig
        from aosae.training.distributed import DistInfo
        from aosae.training.trainer import get_activations

        tcfg = TrainConfig(model=model, tokens=tokens, batch_size=min(2048, tokens),
                           **({} if layer is None else {"layer": int(layer)}))
        acts, _ = get_activations(tcfg, DistInfo(), "cpu", progress=False)
        n_held = model_held_out(acts.shape[0])
        scorer, suite = lm_scorer(tcfg, lm_tokens, probing, probing_tasks, probing_seeds)
        desc = {"data": f"{tcfg.model or 'SmolLM2-135M'} layer {tcfg.layer} residual stream, {acts.shape[0]} tokens; "
                        f"KL/CE scores on {lm_tokens} tokens of the text after them"}
        if suite is not None:
            desc["probing"] = (f"SAEBench sparse probing and SCR/TPP per run on {suite.tasks.note} "
                               f"(seeds {list(suite.seeds)}, the same texts, LM probes and draws for every run)")
        # held out: the last tokens; the Trainer holds out the last 10% of what it is given as well
        return acts[:-n_held], acts[-n_held:], None, desc, scorer
    else:
        raise ValueError(f"unknown dataset {kind!r}; choose from {DATASETS}")
    true_l0 = float((truth.activations > 0).sum(1).double().mean())
    return train.x, truth.x, truth, {"data": desc, "train / held-out tokens": f"{samples} / {held}",
                                     "true L0 (held-out)": round(true_l0, 2)}, None


def model_held_out(tokens: int) -> int:
    """Tokens of the model sweep's held-out set (its last ones) out of `tokens` collected."""
    return max(1000, tokens // 6)


LM_SCORES = ("kl_div_score", "ce_loss_score", "kl_div_with_sae", "ce_loss_with_sae", "ce_loss_without_sae")


# what the ablation keeps of the probing suite's flat metrics (means over its seeds)
PROBING_SCORES = ("llm_test_accuracy", "sae_test_accuracy", "sae_llm_accuracy_ratio",
                  *(f"sae_top_{k}_test_accuracy" for k in K_VALUES), *SCR_SUMMARY, *TPP_SUMMARY)


def lm_scorer(tcfg, n_tokens: int, probing: bool = False, probing_tasks: str = "offline", probing_seeds: tuple = (42, 43)):
    """(sae -> SAEBench's KL and CE-loss scores with the SAE spliced into the LM, on n_tokens of the
    text that follows the cached training tokens (aosae.eval.evaluate, as `aosae eval`), plus its
    sparse probing and SCR/TPP scores when `probing`; the ProbingSuite or None). The suite's LM
    side (activations of the task texts, LM probes per seed) is computed once for every run."""
    from aosae.data.language_models import load_model
    from aosae.data.language_models import resolve_model_name
    from aosae.eval.evaluate import eval_token_ids, evaluate_sae, token_batches_from_ids

    lm, tokenizer = load_model(tcfg.model, "cpu", torch.float32)
    ids = eval_token_ids(tokenizer, tcfg.dataset, n_tokens, tcfg.context, skip_tokens=tcfg.tokens)
    suite = None
    if probing:
        from aosae.eval.probing import prepare_suite

        suite = prepare_suite(lm, tokenizer, tcfg.layer, model_name=resolve_model_name(tcfg.model), tasks=probing_tasks,
                              seeds=probing_seeds, log=print)

    def score(sae) -> dict:
        res = evaluate_sae(sae, lm, token_batches_from_ids(ids, 8), tcfg.layer)
        out = {k: res[k] for k in LM_SCORES}
        if suite is not None:
            metrics, _ = suite.evaluate(sae)
            out.update({k: float(metrics[k]) for k in PROBING_SCORES if k in metrics})
        return out

    return score, suite
