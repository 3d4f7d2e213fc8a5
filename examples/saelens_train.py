"""Train a SAELens SAE with aosae's selective orthogonality penalty.

    pip install 'aosae[saelens]'
    python examples/saelens_train.py --model gpt2 --hook blocks.6.hook_resid_post \
        --dataset NeelNanda/pile-10k --architecture aosae_batchtopk --tokens 2000000 --out runs/gpt2_l6

--architecture is any aosae_<arch> (every SAELens training architecture, with the penalty);
--k sets k for the TopK family, --l1 the L1 coefficient of standard / gated, the rest at
SAELens's defaults (matryoshka_batchtopk: widths d_sae/4, d_sae). Without --model / --dataset it
runs offline on a tiny random HookedTransformer and random tokens (a smoke test of the wiring;
the numbers mean nothing). The trained SAE is saved by SAELens as the plain architecture's
inference SAE: load it with `sae_lens.SAE.load_from_disk(out)` (standard / topk also into aosae
with `aosae.integrations.saelens.import_from_saelens(out)`).
"""
from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence


def build_config(args: argparse.Namespace, d_in: int):
    from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig

    from sae_lens.registry import get_sae_training_class

    import aosae.integrations.saelens  # noqa: F401  (registers every aosae_<arch>)

    # The defaults, spelled out: c·τ·Σ_{top-k pairs}|C_ij| with C = fᵀf / B (per token, like mse_loss).
    penalty = dict(
        orthogonality_coefficient=1.0,
        ortho_scale="per_token",
        ortho_fraction=args.fraction,
        tau_init=0.05,
        tau_min=0.01,
        tau_max=0.1,
        tau_calibration_steps=args.tau_calibration_steps,
    )
    architecture = args.architecture.removeprefix("aosae_")
    own = {}  # the architecture's own settings this script exposes
    if architecture in ("topk", "abstopk", "batchtopk", "matryoshka_batchtopk"):
        own["k"] = args.k
    if architecture in ("standard", "gated"):
        own["l1_coefficient"] = args.l1
    if architecture == "matryoshka_batchtopk":
        own["matryoshka_widths"] = [args.d_sae // 4, args.d_sae]
    _, cfg_cls = get_sae_training_class(args.architecture)
    sae_cfg = cfg_cls(d_in=d_in, d_sae=args.d_sae, **own, **penalty)
    batch_tokens = args.batch_prompts * args.context_size
    return LanguageModelSAERunnerConfig(
        sae=sae_cfg,
        model_name=args.model or "tiny-random",
        hook_name=args.hook,
        dataset_path=args.dataset or "random-tokens",
        is_dataset_tokenized=args.dataset is None,
        streaming=args.dataset is not None,
        context_size=args.context_size,
        training_tokens=args.tokens,
        train_batch_size_tokens=batch_tokens,
        store_batch_size_prompts=args.batch_prompts,
        n_batches_in_buffer=max(4, 2 * args.batch_prompts),
        lr=args.lr,
        device=args.device,
        logger=LoggingConfig(log_to_wandb=False),
        output_path=args.out,
        checkpoint_path=None,
        n_batches_for_norm_estimate=2,
        verbose=False,
    )


def main(argv: Optional[Sequence[str]] = None):
    """Parse arguments, train, return the trained SAELens training SAE."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="TransformerLens model name (default: tiny random model, offline)")
    parser.add_argument("--hook", default="blocks.0.hook_resid_post")
    parser.add_argument("--dataset", default=None, help="HF dataset path with a 'text' column (default: random tokens)")
    parser.add_argument("--architecture", default="aosae_standard",
                        help="aosae_<arch> for any SAELens training architecture, e.g. aosae_topk, aosae_batchtopk, "
                             "aosae_jumprelu, aosae_matryoshka_batchtopk, aosae_gated")
    parser.add_argument("--d-sae", type=int, default=256)
    parser.add_argument("--k", type=int, default=16, help="active latents (per token; BatchTopK: on average)")
    parser.add_argument("--l1", type=float, default=0.04, help="L1 coefficient of aosae_standard / aosae_gated")
    parser.add_argument("--fraction", type=float, default=0.005, help="share of latent pairs penalised")
    parser.add_argument("--tau-calibration-steps", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=16 * 16 * 8, help="training tokens")
    parser.add_argument("--context-size", type=int, default=16)
    parser.add_argument("--batch-prompts", type=int, default=8)
    parser.add_argument("--lr", type=float, default=9e-4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="runs/saelens_aosae")
    args = parser.parse_args(argv)
    if not args.architecture.startswith("aosae_"):
        parser.error(f"--architecture must be aosae_<arch> (the architecture with the penalty), got {args.architecture!r}")

    os.environ.setdefault("WANDB_MODE", "disabled")
    import torch
    from sae_lens import LanguageModelSAETrainingRunner

    model = dataset = None
    if args.model is None:
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        model = HookedTransformer(
            HookedTransformerConfig(
                n_layers=1, d_model=32, n_ctx=args.context_size, d_head=8, n_heads=4, d_mlp=64, d_vocab=128, act_fn="relu"
            )
        )
        d_in = model.cfg.d_model
    else:
        from transformer_lens import HookedTransformer

        model = HookedTransformer.from_pretrained_no_processing(args.model, device=args.device)
        d_in = model.cfg.d_model
    if args.dataset is None:
        from datasets import Dataset

        tokens = torch.randint(0, model.cfg.d_vocab, (64, args.context_size))
        dataset = Dataset.from_dict({"input_ids": tokens.tolist()})

    cfg = build_config(args, d_in)
    sae = LanguageModelSAETrainingRunner(cfg, override_model=model, override_dataset=dataset).run()
    print(f"trained {type(sae).__name__}: tau {sae.tau:.4f}, saved to {args.out}")
    return sae


if __name__ == "__main__":
    main()
