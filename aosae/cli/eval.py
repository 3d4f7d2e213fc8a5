"""`aosae eval RUN_DIR`: SAEBench-style core metrics of a trained SAE spliced into its LM."""
from __future__ import annotations

from typing import Literal, Optional

import tyro


def eval(  # noqa: A001 - the subcommand's name
    run_dir: tyro.conf.Positional[str],
    text: Literal["held-out", "after-training"] = "held-out",
    model: Optional[str] = None,
    dataset: Optional[str] = None,
    tokens: Optional[int] = None,
    batch_size: int = 8,
    context: Optional[int] = None,
    absorption_words: int = 0,
    probing: bool = False,
    scr: bool = False,
    probing_tasks: str = "offline",
    probing_seeds: tuple[int, ...] = (42, 43, 44),
    device: str = "cpu",
) -> int:
    """Evaluate a trained SAE: L0, MSE, cosine, explained variance, dead/dense latents, KL and
    CE-loss scores, decoder cosines and the penalty's |C_ij|; optionally first-letter absorption.
    Writes RUN_DIR/eval.json and prints a table.

    Args:
        run_dir: Run directory written by `aosae train` (cfg.json + sae_weights.safetensors).
        text: Which text: `held-out` re-runs the LM over the tokens that `aosae train` held out
            for its summary (the last ones it collected, never trained on), so the two agree;
            `after-training` reads the text that follows the training tokens (a different part
            of the corpus: numbers differ from the summary when the corpus is not uniform).
        model: Override the model recorded in train_config.json.
        dataset: Override the text dataset recorded in train_config.json (implies after-training text).
        tokens: Tokens to evaluate on (default: the held-out count, or 16384 after training).
        batch_size: Sequences per forward pass.
        context: Sequence length (default: the training context).
        absorption_words: Run first-letter absorption on this many vocabulary words (0 = skip;
            ~1000 is a reasonable CPU budget; meaningful for >= 16k latents on >= 1B-parameter models).
        probing: Add SAEBench's sparse probing (one-vs-rest logistic-regression probes on the LM's and
            the SAE's mean-pooled activations, all dimensions and top-k latents, k = 1 2 5 10 20 50).
        scr: Add SAEBench's SCR (spurious correlation removal) and TPP (targeted probe perturbation):
            zero-ablate the latents with the largest effect on a probe, N = 2 5 10 20 50 100 500.
        probing_tasks: Task set for --probing / --scr: `offline` (Python standard library snippets,
            no network; its numbers are not comparable with published SAEBench numbers), `saebench`
            (SAEBench's 8 datasets from the Hugging Face hub), or comma-separated SAEBench dataset
            ids, each optionally =DIR (a local copy: train.* and test.* files with the hub's columns).
        probing_seeds: Seeds for --probing / --scr (each redraws the negatives and retrains every
            probe); reported: the mean and a 95% interval over seeds.
        device: cpu or cuda[:i].
    """
    from aosae.cli.checks import check_device, check_eval_run, check_lm_packages, check_probing_tasks, require_package
    from aosae.eval import evaluate as E
    from aosae.files import BadFile

    if tokens is not None and tokens < 2:
        raise ValueError(f"--tokens must be >= 2, got {tokens}")
    for name, value, least in (("--batch-size", batch_size, 1), ("--context", context, 2),
                               ("--absorption-words", absorption_words, 0)):
        if value is not None and value < least:
            raise ValueError(f"{name} must be >= {least}, got {value}")
    check_device(device)
    check_lm_packages("eval", dataset or _recorded_dataset(run_dir), given=dataset is not None)  # the text eval reads
    if not (probing or scr):
        from aosae.cli import given_options

        idle = ["--" + name.replace("_", "-") for name in given_options(["probing_tasks", "probing_seeds"])]
        if idle:  # refused rather than ignored: the user expects probing numbers that would never come
            raise ValueError(f"{' and '.join(idle)} {'has' if len(idle) == 1 else 'have'} no effect without --probing "
                             f"or --scr: add --probing and/or --scr, or drop {' and '.join(idle)}")
    else:
        check_probing_tasks(probing_tasks)  # a typo in a dataset id is found before the core metrics run
    if (probing or scr) and not probing_seeds:
        raise ValueError("--probing-seeds needs at least one seed (e.g. --probing-seeds 42 43 44, the default)")
    if probing or scr:  # their packages are found now, not after the core metrics have run
        if len(probing_seeds) > 1:
            require_package("scipy", "--probing/--scr over several seeds (their 95% intervals)",
                            "pip install scipy (or aosae[eval]), or pass one --probing-seeds")
        if probing:
            require_package("sklearn", "--probing (SAEBench's top-k probes)", "pip install scikit-learn (or aosae[eval])")
    check_eval_run(run_dir, model, context)  # its JSON files, and the layer and context against the model
    try:
        res = E.run_eval(run_dir, text=text, model=model, dataset=dataset, n_tokens=tokens, batch_size=batch_size,
                         context=context, absorption_words=absorption_words, device=device, probing=probing, scr=scr,
                         probing_tasks=probing_tasks, probing_seeds=tuple(probing_seeds))
    except ValueError as err:  # a model, layer or dataset the run's files named: say where it came from
        if isinstance(err, BadFile) or str(run_dir) in str(err):
            raise
        raise ValueError(f"{err} (the model, layer and dataset come from {run_dir}/train_config.json and cfg.json "
                         "unless --model, --dataset or --context is given)") from err
    print(E.format_table(res))
    if "absorption_caveat" in res:
        print(res["absorption_caveat"])
    print(f"wrote {run_dir}/eval.json")
    return 0


def _recorded_dataset(run_dir):
    """train_config.json's dataset, if it can be read (check_eval_run names whatever is wrong with it)."""
    import json
    from pathlib import Path

    try:
        value = json.loads((Path(run_dir) / "train_config.json").read_text()).get("dataset")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None
