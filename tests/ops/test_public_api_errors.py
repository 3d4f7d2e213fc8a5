"""The library's public functions given wrong arguments: one clear ValueError/TypeError each.

One parametrised test per entry point (gram_topk, gram_topk_sparse, TopKOrthoLoss and its
sparse forms), over wrong shapes, dtypes, layouts, mixed devices (a meta tensor stands in for a
second device on a CPU-only machine), duplicate TopK indices and NaN/Inf. Each must raise the
documented type with a message that names the argument and says what is expected or what to do,
never an error from deep inside torch or a kernel. The adapters (SAELens, dictionary_learning)
route every tensor through these checks: tests/integrations/test_adapter_errors.py.
"""
from __future__ import annotations


import pytest
import torch

from aosae.nn.loss import TopKOrthoLoss
from error_checks import check
from aosae.ops.gram_topk import gram_topk
from aosae.ops.gram_topk_sparse import gram_topk_sparse

def good_dense(n=6, m=5):
    return torch.rand(m, n)


def nan_at(t: torch.Tensor, value=float("nan")) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[1] = value
    return t



GRAM_TOPK = {
    "not a tensor": (TypeError, "torch.Tensor", lambda: gram_topk([[1.0, 2.0]], 1)),
    "1-D": (ValueError, "2-D", lambda: gram_topk(torch.rand(6), 1)),
    "3-D": (ValueError, "2-D", lambda: gram_topk(torch.rand(2, 3, 4), 1)),
    "int dtype": (TypeError, "floating", lambda: gram_topk(torch.ones(4, 3, dtype=torch.int64), 1)),
    "bool dtype": (TypeError, "floating", lambda: gram_topk(torch.ones(4, 3, dtype=torch.bool), 1)),
    "sparse layout": (TypeError, "dense", lambda: gram_topk(good_dense().to_sparse(), 1)),
    "no rows": (ValueError, "one row", lambda: gram_topk(torch.rand(0, 4), 1)),
    "one column": (ValueError, "2 columns", lambda: gram_topk(torch.rand(4, 1), 1)),
    "k = 0": (ValueError, "k must be in", lambda: gram_topk(good_dense(), 0)),
    "k too large": (ValueError, "k must be in", lambda: gram_topk(good_dense(), 16)),
    "k float": (TypeError, "k must be an int", lambda: gram_topk(good_dense(), 2.0)),
    "k bool": (TypeError, "k must be an int", lambda: gram_topk(good_dense(), True)),
    "similarity": (ValueError, "similarity", lambda: gram_topk(good_dense(), 1, similarity="cos")),
    "unknown backend": (ValueError, "backend", lambda: gram_topk(good_dense(), 1, backend="nope")),
    "NaN": (ValueError, "NaN", lambda: gram_topk(nan_at(good_dense()), 2, backend="reference")),
    "Inf": (ValueError, "NaN/Inf", lambda: gram_topk(nan_at(good_dense(), float("inf")), 2)),
    "threshold on another device": (ValueError, "threshold.*device",
                                    lambda: gram_topk(good_dense(), 2, threshold=torch.tensor(0.5, device="meta"))),
    "threshold not a scalar": (ValueError, "threshold", lambda: gram_topk(good_dense(), 2, threshold=torch.ones(3))),
}


@pytest.mark.parametrize("case", list(GRAM_TOPK))
def test_gram_topk_rejects(case):
    check(*GRAM_TOPK[case])


def sparse_args(**change):
    args = dict(indices=torch.tensor([[0, 2], [1, 3], [2, 3]]), values=torch.rand(3, 2), n_latents=5, k=2)
    args.update(change)
    return args


GRAM_TOPK_SPARSE = {
    "indices not a tensor": (TypeError, "torch.Tensor", sparse_args(indices=[[0, 1]])),
    "float indices": (TypeError, "indices must be int64", sparse_args(indices=torch.rand(3, 2))),
    "int values": (TypeError, "values must be float", sparse_args(values=torch.ones(3, 2, dtype=torch.int64))),
    "shapes differ": (ValueError, "same shape", sparse_args(values=torch.rand(3, 3))),
    "1-D": (ValueError, r"\[B, L\]", sparse_args(indices=torch.tensor([0, 1]), values=torch.rand(2))),
    "mixed devices": (ValueError, "same device", sparse_args(values=torch.rand(3, 2, device="meta"))),
    "n_latents < 2": (ValueError, "n_latents", sparse_args(n_latents=1)),
    "n_latents bool": (ValueError, "n_latents", sparse_args(n_latents=True)),
    "index out of range": (ValueError, r"\[0, n_latents\)", sparse_args(indices=torch.tensor([[0, 5], [1, 3], [2, 3]]))),
    "negative index": (ValueError, r"\[0, n_latents\)", sparse_args(indices=torch.tensor([[0, -1], [1, 3], [2, 3]]))),
    "duplicate TopK index": (ValueError, "repeats a latent", sparse_args(indices=torch.tensor([[0, 2], [3, 3], [2, 4]]))),
    "NaN value": (ValueError, "NaN", sparse_args(values=nan_at(torch.rand(3, 2)))),
    "Inf value": (ValueError, "NaN/Inf", sparse_args(values=nan_at(torch.rand(3, 2), float("-inf")))),
    "k too large": (ValueError, "k must be in", sparse_args(k=11)),
    "n_latents beyond int32": (ValueError, "n = 1000000000000 latents is too many", sparse_args(n_latents=10**12)),
    "k float": (TypeError, "k must be an int", sparse_args(k=1.5)),
    "similarity": (ValueError, "similarity", dict(sparse_args(), similarity="l2")),
}


@pytest.mark.parametrize("case", list(GRAM_TOPK_SPARSE))
def test_gram_topk_sparse_rejects(case):
    raises, match, kwargs = GRAM_TOPK_SPARSE[case]
    check(raises, match, lambda: gram_topk_sparse(**kwargs))


def loss_call(method: str, *args, **init):
    return lambda: getattr(TopKOrthoLoss(**init), method)(*args)


IDX, VAL = torch.tensor([[0, 2], [1, 3]]), torch.rand(2, 2)
TOPK_ORTHO_LOSS = {
    "fraction 0": (ValueError, "fraction", lambda: TopKOrthoLoss(0.0)),
    "fraction > 1": (ValueError, "fraction", lambda: TopKOrthoLoss(1.5)),
    "k = 0": (ValueError, "k must be", lambda: TopKOrthoLoss(k=0)),
    "k float": (ValueError, "k must be", lambda: TopKOrthoLoss(k=2.5)),
    "similarity": (ValueError, "similarity", lambda: TopKOrthoLoss(similarity="l2")),
    "scale": (ValueError, "scale", lambda: TopKOrthoLoss(scale="batch")),
    "reduction": (ValueError, "reduction", lambda: TopKOrthoLoss(reduction="max")),
    "backend unknown, refused when built": (ValueError, "backend 'tritn' is not a gram_topk backend.*auto",
                                            lambda: TopKOrthoLoss(backend="tritn")),
    "forward: 1-D": (ValueError, "2-D", loss_call("forward", torch.rand(8))),
    "forward: int dtype": (TypeError, "floating", loss_call("forward", torch.ones(4, 6, dtype=torch.int32))),
    "forward: not a tensor": (TypeError, "Tensor", loss_call("forward", [[1.0, 2.0]])),
    "forward: NaN": (ValueError, "NaN", loss_call("forward", nan_at(torch.rand(4, 6)), backend="reference")),
    "forward: Inf, auto backend": (ValueError, "NaN/Inf", loss_call("forward", nan_at(torch.rand(4, 6), float("inf")))),
    "from_topk: duplicate index": (ValueError, "repeats a latent",
                                   loss_call("from_topk", torch.tensor([[1, 1], [0, 2]]), VAL, 4)),
    "from_topk: shapes differ": (ValueError, "same shape", loss_call("from_topk", IDX, torch.rand(2, 3), 4)),
    "from_topk: index out of range": (ValueError, r"\[0, n_latents\)", loss_call("from_topk", IDX, VAL, 3)),
    "from_topk: mixed devices": (ValueError, "device", loss_call("from_topk", IDX, VAL.to("meta"), 4)),
    "from_topk: both on meta": (ValueError, "meta device.*pass them on cpu or cuda",
                                loss_call("from_topk", IDX.to("meta"), VAL.to("meta"), 4)),
    "from_topk: NaN": (ValueError, "NaN", loss_call("from_topk", IDX, nan_at(VAL), 4)),
    "from_topk: float indices": (TypeError, "int", loss_call("from_topk", IDX.float(), VAL, 4)),
    "from_topk: n_latents float": (TypeError, "n_latents", loss_call("from_topk", IDX, VAL, 4.0)),
    "from_sparse: not CSR": (TypeError, "offsets, indices, values", loss_call("from_sparse", 5, 4)),
    "from_sparse: offsets 2-D": (ValueError, "offsets", loss_call("from_sparse", (IDX, IDX, VAL), 4)),
    "fraction a string": (TypeError, "fraction must be a number.*'0.1'", lambda: TopKOrthoLoss("0.1")),
    "fraction None": (TypeError, "fraction must be a number", lambda: TopKOrthoLoss(None)),
    "forward: meta tensor": (ValueError, "meta device", loss_call("forward", torch.rand(4, 6, device="meta"))),
    "forward: sparse COO": (TypeError, "dense acts.*to_dense", loss_call("forward", torch.rand(4, 6).to_sparse())),
    "on_support: 1-D": (ValueError, r"2-D.*got shape \(8,\)", loss_call("on_support", torch.rand(8))),
    "on_support: a list": (TypeError, "torch.Tensor.*got list", loss_call("on_support", [[1.0, 2.0], [0.0, 1.0]])),
    "on_support: meta tensor": (ValueError, "on_support.*meta device", loss_call("on_support", torch.rand(4, 6, device="meta"))),
    "on_support: int dtype": (TypeError, "floating", loss_call("on_support", torch.ones(4, 6, dtype=torch.int32))),
}


@pytest.mark.parametrize("case", list(TOPK_ORTHO_LOSS))
def test_topk_ortho_loss_rejects(case):
    check(*TOPK_ORTHO_LOSS[case])


def sae_call(method: str, *args):
    from aosae.nn.sae import SAEConfig, SparseAutoencoder

    return lambda: getattr(SparseAutoencoder(SAEConfig(d_in=8, d_sae=16)), method)(*args)


def load_on(device):
    from aosae.nn.sae import SparseAutoencoder

    return lambda: SparseAutoencoder.load("/no/such/sae", device=device)  # the device is checked before the files


SPARSE_AUTOENCODER = {
    "forward: meta tensor": (ValueError, "x is on meta.*weights are on cpu", sae_call("forward", torch.rand(4, 8, device="meta"))),
    "forward: sparse COO": (TypeError, "x must be a dense tensor.*to_dense", sae_call("forward", torch.rand(4, 8).to_sparse())),
    "forward: wrong width": (ValueError, r"\[\.\.\., 8\], got \(4, 7\)", sae_call("forward", torch.rand(4, 7))),
    "forward: not a tensor": (ValueError, "got list", sae_call("forward", [[0.0] * 8])),
    "encode: meta tensor": (ValueError, "x is on meta", sae_call("encode", torch.rand(4, 8, device="meta"))),
    "decode: sparse COO": (TypeError, "f must be a dense tensor", sae_call("decode", torch.rand(4, 16).to_sparse())),
    "decode: int latents": (TypeError, "f must be a floating-point tensor.*int64", sae_call("decode", torch.ones(4, 16, dtype=torch.long))),
    "forward: NaN": (ValueError, "x holds NaN or Inf", sae_call("forward", torch.rand(4, 8).index_fill_(0, torch.tensor([1]), float("nan")))),
    "forward: Inf": (ValueError, "x holds NaN or Inf", sae_call("forward", torch.rand(4, 8).index_fill_(1, torch.tensor([3]), float("inf")))),
    "encode: NaN": (ValueError, "x holds NaN or Inf", sae_call("encode", torch.rand(4, 8).index_fill_(0, torch.tensor([2]), float("nan")))),
    "encode_sparse: Inf": (ValueError, "x holds NaN or Inf", sae_call("encode_sparse", torch.rand(4, 8).index_fill_(1, torch.tensor([0]), float("-inf")))),
    "save: onto a file": (ValueError, "is a file, not a directory", sae_call("save", __file__)),
    "load: unknown device": (ValueError, "device must be a torch device.*'nope'", load_on("nope")),
    "load: device not a string": (ValueError, "device must be a torch device", load_on(3.5)),
}
if not torch.cuda.is_available():
    SPARSE_AUTOENCODER["load: cuda on a CPU-only machine"] = (ValueError, "CUDA is not available.*pass device=.cpu.", load_on("cuda"))


@pytest.mark.parametrize("case", list(SPARSE_AUTOENCODER))
def test_sparse_autoencoder_rejects(case):
    check(*SPARSE_AUTOENCODER[case])
