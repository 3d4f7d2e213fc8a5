"""A tiny random GPT-2 and a byte-level BPE tokenizer trained on the fly: offline test models."""
from __future__ import annotations

import inspect
from pathlib import Path


def corpus_text() -> str:
    """A few kB of real text (this repo's sources) for tokenizer training and test datasets."""
    import aosae.nn.loss
    import aosae.nn.tau
    import aosae.ops.gram_topk

    return "".join(inspect.getsource(m) for m in (aosae.nn.loss, aosae.nn.tau, aosae.ops.gram_topk))


def make_tiny_lm(directory: Path, n_layer: int = 2, n_embd: int = 32, seed: int = 0) -> Path:
    """Save a random 2-layer GPT-2 (d_model 32) + tokenizer (BOS/EOS/pad) into `directory`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<bos>", "<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([corpus_text()], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=fast.vocab_size, n_positions=128, n_embd=n_embd, n_layer=n_layer, n_head=2,
                        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


def tiny_task_set():
    """A small probing / SCR / TPP TaskSet from corpus_text(): code lines vs prose lines, and a
    spurious pair (x/y crossed with code/prose) for SCR."""
    from aosae.eval import tasks as T

    lines = [ln.strip() for ln in corpus_text().splitlines() if len(ln.strip()) > 20]
    code = [ln for ln in lines if "(" in ln][:64]
    prose = [ln for ln in lines if "(" not in ln][:64]
    ts = T.TaskSet(name="tiny", note="tiny test set")
    ts.probing.append(T.ProbingTask("code_or_not", {"code": ts.add(code[:24]), "prose": ts.add(prose[:24]),
                                                    "mixed": ts.add(code[24:36] + prose[24:36])},
                                    {"code": ts.add(code[40:52]), "prose": ts.add(prose[40:52]),
                                     "mixed": ts.add(code[52:58] + prose[52:58])}))
    ts.tpp = ["code_or_not"]
    quadrant_train = {(a, b): (code if b == "c" else prose)[i * 8:(i + 1) * 8 + 8]
                      for i, (a, b) in enumerate((a, b) for a in ("x", "y") for b in ("c", "p"))}
    quadrant_test = {k: v[::-1] for k, v in quadrant_train.items()}
    tr = T.spurious_groups(quadrant_train, ("x", "y"), ("c", "p"), 4, 0)
    te = T.spurious_groups(quadrant_test, ("x", "y"), ("c", "p"), 4, 0)
    ts.scr.append(T.ScrTask("xy", ("x", "y"), ("c", "p"), {k: ts.add(v) for k, v in tr.items()},
                            {k: ts.add(v) for k, v in te.items()}))
    return ts
