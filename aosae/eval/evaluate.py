"""`aosae eval`: SAEBench-style core metrics of a trained SAE, with the SAE spliced into the LM.

For each batch of token sequences [batch, ctx] it runs the language model three times:
clean, with the hooked layer's residual output replaced by the SAE reconstruction x̂, and
with it replaced by zeros (zero ablation). From these it computes, with SAEBench's names:
  kl_div_with_sae, kl_div_with_ablation, kl_div_score
  ce_loss_without_sae, ce_loss_with_sae, ce_loss_with_ablation, ce_loss_score
and from the activations themselves: l0, l1, mse, cossim, explained_variance (corrected),
explained_variance_legacy, dead/dense fractions, decoder cosine max/mean, and the
penalty's own |C_ij| with C = fᵀf / B over up to 4096 tokens (the batch-mean co-activation
that `aosae train` penalises): mean over the top-k selected pairs and over all pairs.

The hooked layer's "residual output" is the hidden state leaving decoder block
`hook_layer` (= HF hidden_states[hook_layer + 1] = SAELens blocks.{L}.hook_resid_post).
"""
from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from aosae.eval import metrics as M
from aosae.data.language_models import decoder_layers


@contextmanager
def replace_residual(model, layer: int, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Within the block, block `layer`'s output hidden state h [batch, ctx, d] becomes fn(h)."""
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise ValueError(f"hook_layer {layer} out of range: the model has {len(layers)} decoder blocks")

    def hook(_module, _inputs, output):
        if isinstance(output, tuple):
            return (fn(output[0]),) + tuple(output[1:])
        if hasattr(output, "last_hidden_state"):  # a ModelOutput-like block output
            output.last_hidden_state = fn(output.last_hidden_state)
            return output
        return fn(output)

    handle = layers[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def capture_residual(model, layer: int, store: list):
    """Appends block `layer`'s output hidden state to `store` (unchanged forward)."""

    def keep(h):
        store.append(h.detach())
        return h

    with replace_residual(model, layer, keep):
        yield


def _ce_per_token(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy [batch, ctx−1] (float32)."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="none"
    ).view(tokens.shape[0], -1)


def _logits(model, tokens: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=tokens)
    return out.logits if hasattr(out, "logits") else out[0]


@torch.no_grad()
def evaluate_sae(
    sae,
    model,
    token_batches: Iterable[torch.Tensor],
    hook_layer: int,
    fraction: float = 0.005,
    skip_first: int = 1,
    log: Optional[Callable[[str], None]] = None,
) -> dict:
    """Core metrics of `sae` on the LM `model` at decoder block `hook_layer`.

    Args:
        sae: SparseAutoencoder (encode, decode, W_dec [d_sae, d_in]).
        model: HF causal LM (any module whose forward(input_ids=) returns logits).
        token_batches: iterable of int64 [batch, ctx] token ids.
        hook_layer: index of the decoder block whose output the SAE reads.
        fraction: pair share for the top-k |C_ij| statistic (as in training).
        skip_first: positions at the start of each sequence excluded from the activation
            metrics (the BOS/first position has an outsized norm in most LMs; SAEBench
            excludes special tokens the same way). KL/CE use all positions.

    Returns a flat dict of floats (see module docstring) plus n_tokens, n_sequences.
    """
    stats = M.ReconstructionStats()
    kl_sae, kl_abl, ce_clean, ce_sae, ce_abl = [], [], [], [], []
    sample_latents = []
    n_seq = 0
    device = next(sae.parameters()).device
    for tokens in token_batches:
        tokens = tokens.to(next(model.parameters()).device)
        acts: list = []
        with capture_residual(model, hook_layer, acts):
            clean = _logits(model, tokens)
        x = acts[0]

        def splice(h):
            return sae.decode(sae.encode(h.to(device, torch.float32))).to(h.dtype).to(h.device)

        with replace_residual(model, hook_layer, splice):
            with_sae = _logits(model, tokens)
        with replace_residual(model, hook_layer, torch.zeros_like):
            ablated = _logits(model, tokens)
        kl_sae.append(M.kl_div_per_token(clean, with_sae).flatten())
        kl_abl.append(M.kl_div_per_token(clean, ablated).flatten())
        ce_clean.append(_ce_per_token(clean, tokens).flatten())
        ce_sae.append(_ce_per_token(with_sae, tokens).flatten())
        ce_abl.append(_ce_per_token(ablated, tokens).flatten())
        xs = x[:, skip_first:].reshape(-1, x.shape[-1]).to(device, torch.float32)
        f = sae.encode(xs)
        stats.update(xs, sae.decode(f), f)
        if sum(t.shape[0] for t in sample_latents) < 4096:
            sample_latents.append(f)
        n_seq += tokens.shape[0]
        if log is not None:
            log(f"  eval: {n_seq} sequences, {stats.n_tokens} tokens")
    if n_seq == 0:
        raise ValueError("evaluate_sae got no token batches: check the dataset and --tokens")
    res = stats.result()
    mean = lambda xs: float(torch.cat(xs).double().mean())  # noqa: E731
    res.update(
        kl_div_with_sae=mean(kl_sae),
        kl_div_with_ablation=mean(kl_abl),
        ce_loss_without_sae=mean(ce_clean),
        ce_loss_with_sae=mean(ce_sae),
        ce_loss_with_ablation=mean(ce_abl),
    )
    res["kl_div_score"] = M.kl_score(res["kl_div_with_ablation"], res["kl_div_with_sae"])
    res["ce_loss_score"] = M.ce_loss_score(res["ce_loss_with_ablation"], res["ce_loss_with_sae"], res["ce_loss_without_sae"])
    res.update(M.decoder_cosine_stats(sae.W_dec))
    f = torch.cat(sample_latents)[:4096]
    co = M.coactivation_stats(f / math.sqrt(f.shape[0]), fraction)  # C = fᵀf / B, the trainer's penalty scale
    res["topk_abs_c_mean"], res["all_abs_c_mean"] = co["topk_abs_c_mean"], co["all_abs_c_mean"]
    res["n_sequences"] = n_seq
    return res


TABLE = (
    ("reconstruction", ("cossim", "explained_variance", "explained_variance_legacy", "mse")),
    ("sparsity", ("l0", "l1", "dead_fraction", "dense_fraction")),
    ("model preservation", ("kl_div_score", "kl_div_with_sae", "kl_div_with_ablation",
                            "ce_loss_score", "ce_loss_with_sae", "ce_loss_without_sae", "ce_loss_with_ablation")),
    ("geometry", ("decoder_cos_max", "decoder_cos_mean", "decoder_cos_max_mean", "topk_abs_c_mean", "all_abs_c_mean")),
    ("absorption", ("mean_absorption_fraction_score", "mean_full_absorption_score", "mean_num_split_features")),
    ("sparse probing (SAEBench; mean over seeds ± 95% interval)", ("llm_test_accuracy", "sae_test_accuracy",
                                                                   "sae_llm_accuracy_ratio",
                                                                   *(f"llm_top_{k}_test_accuracy" for k in (1, 2, 5, 10, 20, 50)),
                                                                   *(f"sae_top_{k}_test_accuracy" for k in (1, 2, 5, 10, 20, 50)))),
    ("SCR (SAEBench)", tuple(f"scr_metric_threshold_{n}" for n in (2, 5, 10, 20, 50, 100, 500))),
    ("TPP (SAEBench)", tuple(f"tpp_threshold_{n}_total_metric" for n in (2, 5, 10, 20, 50, 100, 500))),
)


def format_table(res: dict) -> str:
    """A plain-text table of the metrics present in `res`, grouped as in SAEBench."""
    lines = []
    for group, keys in TABLE:
        present = [k for k in keys if k in res]
        if not present:
            continue
        lines.append(f"{group}")
        for k in present:
            v = res[k]
            ci = res.get(f"{k}_ci95")
            text = f"{v:.5g}" if isinstance(v, float) else f"{v}"
            lines.append(f"  {k:<32} {text}" + (f" ± {ci:.2g}" if isinstance(ci, float) else ""))
    if "sae_llm_accuracy_ratio" in res:
        lines.append("sae_llm_accuracy_ratio = sae_test_accuracy / llm_test_accuracy; the paper's \"93.99% of the "
                     "model's accuracy (baseline 95.19%)\" reads as sae_test_accuracy = 0.9399 vs llm_test_accuracy = 0.9519")
    if "probing_task_note" in res:
        lines.append(f"probing/SCR/TPP: {res['probing_task_note']} (seeds {res.get('probing_seeds')})")
    return "\n".join(lines)


def _json_safe(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def write_eval(run_dir, res: dict) -> Path:
    path = Path(run_dir) / "eval.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_json_safe(res), indent=1))
    tmp.replace(path)
    return path


def token_batches_from_ids(ids: torch.Tensor, batch_size: int) -> Iterable[torch.Tensor]:
    """Splits [n_seq, ctx] token ids into batches."""
    for s in range(0, ids.shape[0], batch_size):
        yield ids[s : s + batch_size]


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def read_train_config(run_dir) -> dict:
    """RUN_DIR/train_config.json as a dict ({} when absent: then --model/--dataset decide)."""
    path = Path(run_dir) / "train_config.json"
    return json.loads(path.read_text()) if path.exists() else {}


def run_eval(
    run_dir,
    model: Optional[str] = None,
    dataset: Optional[str] = None,
    n_tokens: Optional[int] = None,
    batch_size: int = 8,
    context: Optional[int] = None,
    absorption_words: int = 0,
    device: str = "cpu",
    log: Callable[[str], None] = print,
    text: str = "held-out",
    probing: bool = False,
    scr: bool = False,
    probing_tasks="offline",
    probing_seeds: tuple[int, ...] = (42, 43, 44),
) -> dict:
    """The `aosae eval` logic: load RUN_DIR's SAE, the model and text it was trained on
    (overridable), compute every metric, write RUN_DIR/eval.json, return the dict.

    probing / scr add SAEBench's sparse probing / SCR and TPP on the task set `probing_tasks`
    (eval/probing.py), over `probing_seeds`; their details go to RUN_DIR/probing.json.

    text="held-out" runs the LM over the tokens the trainer held out for summary.json (so
    the reconstruction numbers agree with it); "after-training" over the text that follows
    the training tokens. A run without summary.json, another dataset, or a multi-rank run
    (whose held-out tokens are spread over ranks) falls back to "after-training".
    """
    from aosae.data.language_models import load_model
    from aosae.nn.sae import SparseAutoencoder

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} does not exist: pass a run directory written by `aosae train`")
    sae = SparseAutoencoder.load(run_dir, device=device).eval()
    tcfg = read_train_config(run_dir)
    model_name = model or tcfg.get("model") or sae.cfg.model_name
    layer = sae.cfg.hook_layer if sae.cfg.hook_layer is not None else tcfg.get("layer")
    if layer is None:
        raise ValueError(f"{run_dir}: neither cfg.json (hook_layer) nor train_config.json (layer) names the hooked layer")
    ctx = int(context or tcfg.get("context_size") or sae.cfg.context_size or 128)
    dataset = dataset if dataset is not None else tcfg.get("dataset")
    if (probing or scr) and isinstance(probing_tasks, str):  # a bad task set fails before the core eval's minutes
        from aosae.eval.tasks import load_task_set

        probing_tasks = load_task_set(probing_tasks, log=log)
    lm, tokenizer = load_model(model_name, device, torch.float32)
    lm.eval()
    skip, n_tokens, text = eval_text(run_dir, tcfg, dataset, n_tokens, text, log)
    log(f"eval: {run_dir} | model {model_name or 'embedded default'} layer {layer} | "
        f"dataset {dataset or 'embedded default'} | {text} text: {n_tokens} tokens after {skip}, context {ctx}")
    ids = eval_token_ids(tokenizer, dataset, n_tokens, ctx, skip_tokens=skip, partial_first=text == "held-out")
    (res, seconds) = timed(evaluate_sae, sae, lm, token_batches_from_ids(ids, batch_size), int(layer))
    if ids.shape[0] < max(1, -(-n_tokens // (ctx - 1))):  # the text ran out: say so rather than report fewer silently
        import warnings

        warnings.warn(f"evaluated {res.get('n_tokens', ids.shape[0] * (ctx - 1))} tokens, not the {n_tokens} asked "
                      f"for: dataset {dataset or 'embedded default'} has only {ids.shape[0]} windows of {ctx} tokens "
                      f"after its first {skip} tokens, the run's training text (pass fewer --tokens, or a --dataset with more text)",
                      stacklevel=2)
    res.update(model=model_name or "embedded default", dataset=dataset or "embedded default",
               hook_layer=int(layer), context_size=ctx, d_sae=sae.cfg.d_sae, d_in=sae.cfg.d_in,
               eval_seconds=round(seconds, 1), text=text, skipped_tokens=skip)
    if absorption_words > 0:
        from aosae.eval.absorption import AbsorptionConfig, absorption_eval

        ab = absorption_eval(sae, lm, tokenizer, int(layer), AbsorptionConfig(max_words=absorption_words), log=log)
        per_letter = ab.pop("absorption_per_letter")
        res.update(ab)
        (run_dir / "absorption_per_letter.json").write_text(json.dumps(per_letter, indent=1))
    if probing or scr:
        extra, seconds = timed(probing_eval, sae, lm, tokenizer, int(layer), model_name=model_name, probing=probing,
                               scr=scr, tasks=probing_tasks, seeds=probing_seeds, device=device, log=log)
        metrics, details = extra
        res.update(metrics, probing_seconds=round(seconds, 1))
        (run_dir / "probing.json").write_text(json.dumps(details, indent=1, default=float))
    write_eval(run_dir, res)
    return res


def probing_eval(sae, lm, tokenizer, layer: int, *, model_name: Optional[str], probing: bool = True, scr: bool = True,
                 tasks="offline", seeds=(42, 43, 44), context: int = 128, device: str = "cpu",
                 log: Callable[[str], None] = print) -> tuple[dict, dict]:
    """Sparse probing and/or SCR+TPP of `sae` (SAEBench's definitions, eval/probing.py):
    (flat metrics for eval.json, details per dataset, class and seed)."""
    from aosae.data.language_models import resolve_model_name
    from aosae.eval.probing import prepare_suite

    suite = prepare_suite(lm, tokenizer, layer, model_name=resolve_model_name(model_name), tasks=tasks,
                          context=context, seeds=seeds, device=device, log=log)
    return suite.evaluate(sae, probing=probing, scr=scr)


def eval_text(run_dir: Path, tcfg: dict, dataset: Optional[str], n_tokens: Optional[int], text: str,
              log: Callable[[str], None]) -> tuple[int, int, str]:
    """(tokens to skip, tokens to evaluate, the text actually used) for run_eval."""
    if text not in ("held-out", "after-training"):
        raise ValueError(f"text must be 'held-out' or 'after-training', got {text!r}")
    summary_path = run_dir / "summary.json"
    held = json.loads(summary_path.read_text()).get("held_out") if summary_path.is_file() else None
    if text == "held-out":
        why = ("no summary.json with the held-out tokens" if not held
               else "the run used several ranks" if held.get("world_size", 1) != 1
               else "--dataset differs from the training text" if dataset != tcfg.get("dataset") else None)
        if why is None:
            return int(held["first_token"]), int(n_tokens or held["tokens"]), text
        log(f"eval: evaluating on the text after the training tokens ({why})")
    trained = tcfg.get("tokens") if dataset == tcfg.get("dataset") else None
    skip = int(trained) if isinstance(trained, int) and trained <= 5_000_000 else 0  # past that, tokenising costs more
    return skip, int(n_tokens or 16384), "after-training"


def eval_token_ids(tokenizer, dataset: Optional[str], n_tokens: int, context: int, skip_tokens: int = 0,
                   partial_first: bool = False) -> torch.Tensor:
    """[n_seq, context] int64 token windows (BOS + context − 1 tokens, the trainer's packing
    from aosae.data), n_seq = ceil(n_tokens / (context − 1)), after skipping the windows
    that hold the first `skip_tokens` tokens (the training run's, so eval text is held out).
    partial_first keeps the window in which token `skip_tokens` falls (the trainer's held-out
    tokens start inside one).
    """
    from aosae.data.text import iter_texts, token_windows

    n_seq = max(1, -(-n_tokens // (context - 1)))
    skip = (skip_tokens // (context - 1)) if partial_first else -(-skip_tokens // (context - 1))
    rows = []
    for i, window in enumerate(token_windows(iter_texts(dataset), tokenizer, context)):
        if i < skip:
            continue
        rows.append(window)
        if len(rows) == n_seq:
            break
    if not rows:
        raise ValueError(f"dataset {dataset or 'default'} has no text left after the {skip_tokens} training tokens; "
                         f"pass --dataset with held-out text")
    return torch.stack(rows)
