"""Drop-in use of aosae's selective orthogonality penalty in other SAE codebases.

Each submodule needs its codebase installed and is imported explicitly (nothing here
imports SAELens or dictionary_learning, so `import aosae` stays light):

    aosae.integrations.saelens              SAELens training-SAE classes registered as
                                            "aosae_standard" / "aosae_topk", and format
                                            conversion aosae <-> SAELens on-disk format
                                            (`pip install 'aosae[saelens]'`)
    aosae.integrations.dictionary_learning  trainer subclasses for dictionary_learning's
                                            trainSAE (`pip install 'aosae[dictlearn]'`,
                                            see .ci/install_integrations.sh for a safe recipe)

Any other training loop needs no integration at all: add
`tau * TopKOrthoLoss()(latents)` to its loss (examples/plain_pytorch.py).

Every adapter uses TopKOrthoLoss's one scale: per token (C = fᵀf / B) by default, the
paper's literal batch sum with `ortho_scale="batch_sum"`.
"""
from __future__ import annotations

import importlib.util

__all__ = ["missing_dependency_message"]

_INSTALL_HINTS = {
    "sae_lens": "pip install 'aosae[saelens]'  (or: pip install sae-lens)",
    "dictionary_learning": "bash .ci/install_integrations.sh dictlearn  (a plain `pip install "
    "dictionary-learning` pulls a CUDA torch and a torchvision that breaks transformers on CPU machines)",
}


def missing_dependency_message(module: str) -> str | None:
    """None if `module` is importable, else a sentence saying how to install it."""
    if importlib.util.find_spec(module) is not None:
        return None
    hint = _INSTALL_HINTS.get(module, f"pip install {module}")
    return f"aosae.integrations needs the optional package {module!r}, which is not installed: {hint}"

