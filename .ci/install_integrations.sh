#!/usr/bin/env bash
# Install the optional SAE-codebase integrations of aosae into the current Python
# environment without replacing torch or transformers.
#
#   bash .ci/install_integrations.sh [saelens|dictlearn|saebench|all|bench]     (default: all; bench is not in all)
#   PYTHON=/path/to/python bash .ci/install_integrations.sh ...   (default: python)
#
# Why not a plain `pip install sae-lens dictionary-learning`:
#   - dictionary-learning 0.1.0 requires nnsight<0.4, whose requirements include torchvision
#     and diffusers; resolving them replaces the CPU torch with a multi-GB CUDA torch and adds a
#     torchvision that breaks `import transformers` model classes on CPU machines. Neither
#     torchvision nor diffusers is needed to import dictionary_learning or run trainSAE, nor are
#     umap-learn / circuitsvis (used only by dictionary_learning.interp). So dictionary-learning
#     and nnsight are installed with --no-deps and the modules they import are listed here.
#   - sae-bench 0.6.0 (used only by tests/eval/test_saebench_crosscheck.py, which runs aosae's sparse
#     probing / SCR / TPP and SAEBench's own functions on the same activations) pins numpy<2,
#     datasets<4 and torchvision, and needs sae-probes and openai for evals aosae does not compare
#     with. So it is installed with --no-deps, plus what its sparse_probing and scr_and_tpp modules
#     import (sae_lens and transformer_lens via sae-lens, scikit-learn, einops, beartype, jaxtyping,
#     pandas, datasets, tabulate, pydantic).
#   - sae-lens resolves cleanly (transformer-lens 3.x, transformers<6, torch>=2.6 accept what is
#     installed), but every install below runs under a constraints file pinning the installed
#     torch / transformers / numpy, so pip fails loudly instead of swapping them.
set -euo pipefail

PY="${PYTHON:-python}"
WHAT="${1:-all}"
case "$WHAT" in saelens|dictlearn|saebench|all|bench) ;; *) echo "usage: $0 [saelens|dictlearn|saebench|all|bench]" >&2; exit 2 ;; esac

constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
"$PY" - >"$constraints" <<'EOF'
from importlib.metadata import PackageNotFoundError, version
for name in ("torch", "transformers", "numpy"):
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        pass
EOF
echo "install_integrations: pinning $(tr '\n' ' ' <"$constraints")"
torch_before="$("$PY" -c 'import torch; print(torch.__version__)')"

pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check -c "$constraints" "$@"; }

if [[ "$WHAT" == saelens || "$WHAT" == all ]]; then
    pip_install "sae-lens==6.54.12"  # the one tested version of the adapters' range >=6.54,<7
fi

if [[ "$WHAT" == dictlearn || "$WHAT" == all ]]; then
    pip_install --no-deps "dictionary-learning==0.1.0" "nnsight>=0.3,<0.4"
    # What dictionary_learning (training, buffer, trainers) and nnsight import at module level.
    pip_install "python-socketio[client]" pyyaml zstandard einops wandb pandas plotly tqdm \
        "datasets>=2.18" accelerate protobuf sentencepiece "pydantic>=2.9"
fi

if [[ "$WHAT" == saebench || "$WHAT" == all ]]; then
    # sae_bench's modules import sae_lens and transformer_lens at module level: sae-lens brings both.
    pip_install "sae-lens==6.54.12"  # the adapters' tested version (sae-bench itself accepts >=6.28,<7)
    pip_install --no-deps "sae-bench==0.6.0"
    pip_install "scikit-learn>=1.5.2" einops beartype jaxtyping pandas "datasets>=2.18" tabulate "pydantic>=2.9" tqdm
fi

# bench (not in all; CI does not need it): EleutherAI sparsify, the peer of benchmarks/width_sweep.py.
# eai-sparsify 1.3.3 requires an unpinned torch, datasets and transformers: --no-deps, then what it imports.
if [[ "$WHAT" == bench ]]; then
    pip_install --no-deps "eai-sparsify==1.3.3" natsort schedulefree
    pip_install einops simple-parsing accelerate huggingface-hub safetensors typing-extensions
fi

# A torchvision built for another torch (left by an earlier plain install) breaks transformers.
if ! "$PY" -c 'import transformers; from transformers import AutoModelForCausalLM' >/dev/null 2>&1; then
    if "$PY" -m pip show torchvision >/dev/null 2>&1; then
        echo "install_integrations: transformers fails to import with this torchvision; uninstalling torchvision"
        "$PY" -m pip uninstall --quiet -y torchvision
    fi
fi

"$PY" - "$torch_before" "$WHAT" <<'EOF'
import sys
import torch
from transformers import AutoModelForCausalLM  # noqa: F401  (must still import)
before, what = sys.argv[1], sys.argv[2]
assert torch.__version__ == before, f"torch changed from {before} to {torch.__version__}"
if what in ("saelens", "all"):
    import sae_lens
    print(f"install_integrations: sae_lens {sae_lens.__version__}")
if what in ("dictlearn", "all"):
    import dictionary_learning
    from dictionary_learning.training import trainSAE  # noqa: F401
    print(f"install_integrations: dictionary_learning {dictionary_learning.__version__}")
if what in ("saebench", "all"):
    from importlib.metadata import version
    import sae_bench.evals.scr_and_tpp.main  # noqa: F401
    import sae_bench.evals.sparse_probing.main  # noqa: F401
    print(f"install_integrations: sae_bench {version('sae-bench')}")
if what == "bench":
    import os

    os.environ["SPARSIFY_DISABLE_TRITON"] = "1"  # its Triton decoder fails on CPU tensors
    import sparsify
    print(f"install_integrations: sparsify {sparsify.__version__}")
print(f"install_integrations: torch {torch.__version__} unchanged")
EOF
