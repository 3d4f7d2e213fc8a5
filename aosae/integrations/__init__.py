"""Drop-in use of aosae's selective orthogonality penalty in other SAE codebases.

Each submodule needs its codebase installed and is imported explicitly (nothing here
imports SAELens or dictionary_learning, so `import aosae` stays light):

    aosae.integrations.saelens              "aosae_<arch>" for every SAELens training architecture
                                            (one wrapper: add_orthogonality), and format conversion
                                            aosae <-> SAELens on-disk format (`pip install 'aosae[saelens]'`)
    aosae.integrations.dictionary_learning  Aosae<Trainer> for every dictionary_learning trainer, for
                                            its trainSAE (`pip install 'aosae[dictlearn]'`, see
                                            .ci/install_integrations.sh for a safe recipe)
    aosae.integrations.latents              how both hand an architecture's latents to the penalty
                                            (TopK rows, ragged BatchTopK rows, the support, JumpReLU's
                                            STE window, dense), library-free

Each adapter checks the library's version at import (SUPPORTED_VERSIONS, check_version).

Any other training loop needs no integration at all: add
`tau * TopKOrthoLoss()(latents)` to its loss (examples/plain_pytorch.py).

Every adapter uses TopKOrthoLoss's one scale: per token (C = fᵀf / B) by default, the
paper's literal batch sum with `ortho_scale="batch_sum"`.
"""
from __future__ import annotations

import importlib.util
import re

__all__ = ["SUPPORTED_VERSIONS", "check_version", "missing_dependency_message"]

# The versions each adapter supports: [minimum, below) of the distribution's major.minor(.patch).
# CI installs one pinned version of each (.ci/install_integrations.sh): sae-lens 6.54.12, whose
# registry the SAELens adapter wraps, and dictionary-learning 0.1.0 (the only release).
SUPPORTED_VERSIONS = {
    "sae_lens": ((6, 54), (7,)),
    "dictionary_learning": ((0, 1), (0, 2)),
}
_DISTRIBUTIONS = {"sae_lens": "sae-lens", "dictionary_learning": "dictionary-learning"}

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



def _release(version: str) -> tuple[int, ...]:
    """The leading numeric release of a version string: "6.54.12" -> (6, 54, 12), "0.1.0rc1" -> (0, 1, 0)."""
    release = []
    for part in version.split("+")[0].split("."):
        digits = re.match(r"\d+", part)
        if digits is None:
            break
        release.append(int(digits.group()))
        if digits.group() != part:  # "0rc1": a pre-release tag ends the release numbers
            break
    return tuple(release)


def check_version(module: str, installed: str) -> None:
    """Raise ImportError, saying what to install, if `installed` is outside SUPPORTED_VERSIONS[module]."""
    minimum, below = SUPPORTED_VERSIONS[module]
    release = _release(str(installed))
    if not release or not (minimum <= release < below):
        wanted = f">={'.'.join(map(str, minimum))},<{'.'.join(map(str, below))}"
        raise ImportError(
            f"aosae.integrations supports {_DISTRIBUTIONS[module]}{wanted} (CI tests one pinned version: "
            f".ci/install_integrations.sh), but {installed!r} is installed: pip install '{_DISTRIBUTIONS[module]}{wanted}'"
        )
