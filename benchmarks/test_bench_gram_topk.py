"""pytest-benchmark suite: reference vs the fused cpu backend across n.

    pytest benchmarks --benchmark-only

Peak memory of the first call is recorded in each benchmark's extra_info. For the
numbers the targets are stated in (one process per measurement, half-GEMM floor), run
benchmarks/cpu_sweep.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import aosae  # noqa: E402
import machine  # noqa: E402
from aosae.ops import extension as _extension  # noqa: E402

M = 2048
SIZES = [1024, 2048, 4096, 8192]


@pytest.fixture(scope="module", params=SIZES, ids=lambda n: f"n={n}")
def activations(request):
    g = torch.Generator().manual_seed(0)
    return torch.relu(torch.randn(M, request.param, generator=g) - 0.5)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gram_topk(benchmark, activations, backend):
    if backend == "cpu" and not _extension.available()[0]:
        pytest.skip(_extension.available()[1])
    n = activations.shape[1]
    k = aosae.k_for_fraction(n, 0.005)
    _, peak = machine.peak_cpu_memory_mib(lambda: aosae.gram_topk(activations, k, backend=backend))
    benchmark.extra_info.update({"n": n, "m": M, "k": k, "peak_mib": round(peak, 1), "machine": machine.machine_name()})
    benchmark.group = f"gram_topk n={n}"
    benchmark.pedantic(aosae.gram_topk, args=(activations, k), kwargs={"backend": backend}, rounds=3, iterations=1)


def test_half_gemm_floor(benchmark, activations):
    benchmark.group = f"gram_topk n={activations.shape[1]}"
    benchmark.extra_info["note"] = "full torch.mm(aT, a): the fused kernel's floor is half of this"
    benchmark.pedantic(torch.mm, args=(activations.t(), activations), rounds=3, iterations=1)
