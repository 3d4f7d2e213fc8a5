"""Train dictionary_learning SAEs with aosae's selective orthogonality penalty via trainSAE.

    bash .ci/install_integrations.sh dictlearn
    python examples/dictionary_learning_train.py --out runs/dl_aosae

`data` may be any iterator of activation batches [batch, d]: dictionary_learning's
ActivationBuffer over an nnsight LanguageModel in real use; here, by default, random
activations with a few planted correlated directions (offline, seconds on a CPU).
Each trainer writes SAVE_DIR/trainer_<i>/ae.pt + config.json (the penalty settings are in it).
"""
from __future__ import annotations

import argparse
from typing import Iterator, Optional, Sequence

import torch


def toy_activations(d: int, batch: int, steps: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """Batches [batch, d] from sparse combinations of 4·d random unit directions."""
    gen = torch.Generator().manual_seed(seed)
    dictionary = torch.nn.functional.normalize(torch.randn(4 * d, d, generator=gen), dim=1)
    for _ in range(steps):
        codes = torch.rand(batch, 4 * d, generator=gen) * (torch.rand(batch, 4 * d, generator=gen) < 0.02)
        yield codes @ dictionary


def main(argv: Optional[Sequence[str]] = None) -> str:
    """Parse arguments, train a standard, a TopK and a BatchTopK SAE, return the save directory."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=32, help="activation dimension")
    parser.add_argument("--dict-size", type=int, default=128)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--fraction", type=float, default=0.005)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="runs/dictionary_learning_aosae")
    args = parser.parse_args(argv)

    from dictionary_learning.training import trainSAE

    # Every dictionary_learning trainer has its Aosae<Trainer> twin (AosaeJumpReluTrainer,
    # AosaeMatryoshkaBatchTopKTrainer, AosaeGatedSAETrainer, ...): the trainer's own arguments + the penalty's.
    from aosae.integrations.dictionary_learning import AosaeBatchTopKTrainer, AosaeStandardTrainer, AosaeTopKTrainer

    common = dict(
        steps=args.steps,
        activation_dim=args.d,
        dict_size=args.dict_size,
        layer=0,
        lm_name="toy",
        warmup_steps=max(1, args.steps // 10),
        device=args.device,
        seed=0,
        # the penalty: c·τ·Σ_{top-k pairs}|C_ij|, C = fᵀf / B (per token, like the trainers' MSE), adaptive τ
        ortho_scale="per_token",
        ortho_fraction=args.fraction,
        tau_init=0.05,
        tau_calibration_steps=max(1, args.steps // 5),
    )
    trainSAE(
        data=toy_activations(args.d, args.batch, args.steps),
        trainer_configs=[
            dict(trainer=AosaeStandardTrainer, lr=1e-3, l1_penalty=0.04, sparsity_warmup_steps=args.steps // 10, **common),
            dict(trainer=AosaeTopKTrainer, k=args.k, threshold_start_step=args.steps // 2, **common),
            dict(trainer=AosaeBatchTopKTrainer, k=args.k, threshold_start_step=args.steps // 2, **common),
        ],
        steps=args.steps,
        save_dir=args.out,
        device=args.device,
    )
    print(f"saved {args.out}/trainer_0 (standard), {args.out}/trainer_1 (topk), {args.out}/trainer_2 (batchtopk)")
    return args.out


if __name__ == "__main__":
    main()
