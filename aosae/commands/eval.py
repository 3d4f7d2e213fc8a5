"""`aosae eval RUN_DIR [--model ...] [--dataset ...] [--tokens N]`: SAEBench-style core metrics.

Loads the SAE saved in RUN_DIR, the model and text recorded in RUN_DIR/train_config.json
(unless overridden), splices the SAE into the model at the hooked layer and reports L0,
MSE, cosine similarity, explained variance, dead/dense latents, KL and CE-loss scores,
decoder cosines and the penalty's |C_ij|; optionally first-letter absorption. Writes
RUN_DIR/eval.json and prints a table.
"""
from __future__ import annotations

import argparse

from .. import evaluate as E


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a trained SAE (SAEBench core metrics, KL/CE scores, absorption)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="run directory written by `aosae train` (cfg.json + sae_weights.safetensors)")
    p.add_argument("--model", default=None, help="override the model recorded in train_config.json")
    p.add_argument("--dataset", default=None, help="override the text dataset recorded in train_config.json")
    p.add_argument("--tokens", type=int, default=16384, help="tokens to evaluate on (default 16384)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--context", type=int, default=None, help="sequence length (default: the training context)")
    p.add_argument("--absorption-words", type=int, default=0,
                   help="run first-letter absorption on this many vocabulary words (0 = skip; ~1000 is a "
                        "reasonable CPU budget; meaningful only for >= 16k latents on >= 1B-parameter models)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=main)


def main(args) -> int:
    if args.tokens < 2:
        raise SystemExit("aosae eval: --tokens must be >= 2")
    res = E.run_eval(args.run_dir, model=args.model, dataset=args.dataset, n_tokens=args.tokens,
                     batch_size=args.batch_size, context=args.context, absorption_words=args.absorption_words,
                     device=args.device)
    print(E.format_table(res))
    if "absorption_caveat" in res:
        print(res["absorption_caveat"])
    print(f"wrote {args.run_dir}/eval.json")
    return 0
