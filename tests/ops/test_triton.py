"""The Triton backend under Triton's CPU interpreter: same pairs as the float64 oracle on
tiny inputs, every dtype, ties, zeros, cosine, and every retry path of the threshold."""
import importlib
import os

# must be set before triton is imported and the kernels are defined: @triton.jit picks the
# interpreter when it decorates
_PREVIOUS = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (pip install 'aosae[triton]')")

import aosae  # noqa: E402
from aosae.ops.backends import reference  # noqa: E402
from oracle import assert_identical, assert_matches_oracle  # noqa: E402

from aosae.kernels import gram_topk as triton_kernels  # noqa: E402
from aosae.ops.backends import triton_driver as kernel  # noqa: E402
from aosae.ops.conventions import select_topk  # noqa: E402

if "Interpreted" not in type(triton_kernels._collect_kernel).__name__:  # imported earlier without the interpreter
    kernel = importlib.reload(kernel)

# other test modules must not see the interpreter switch (it makes backend="triton" usable on
# CPU); the fixture below turns it on for this module's tests only
if _PREVIOUS is None:
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _PREVIOUS


@pytest.fixture(autouse=True)
def _interpret(monkeypatch, seed):  # seed: fresh inputs per run, printed on failure
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def run(a, k, cosine=False, **kw):
    """The public op with the triton backend."""
    return aosae.gram_topk(a, k, similarity="cosine" if cosine else "dot", backend="triton", **kw)


@pytest.mark.parametrize("m,n", [(1, 2), (5, 3), (33, 37), (5, 100), (17, 128)])
@pytest.mark.parametrize("cosine", [False, True])
def test_random_matches_oracle(m, n, cosine):
    a = torch.randn(m, n)
    for k in sorted({1, max(1, n * (n - 1) // 50), n * (n - 1) // 2}):
        assert_matches_oracle(run(a, k, cosine), a, k, cosine)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("cosine", [False, True])
def test_dtypes(dtype, cosine):
    a = torch.randn(9, 37).to(dtype)
    pairs = run(a, 40, cosine)
    assert pairs.values.dtype == torch.float32
    assert_matches_oracle(pairs, a, 40, cosine)


def test_ties_integer_inputs_equal_reference():
    # small integers: every score is exact in fp32, so the result must equal the reference bit for bit
    a = torch.randint(-2, 3, (6, 45)).float()
    for k in (1, 7, 100, 990):
        got = run(a, k)
        assert_matches_oracle(got, a, k)
        assert_identical(got, reference.forward(a, k, False))


def test_all_equal_columns_tie_everywhere():
    a = torch.ones(3, 20)
    got = run(a, 13)
    assert_matches_oracle(got, a, 13)
    assert got.rows.tolist() == [0] * 13 and got.cols.tolist() == list(range(1, 14))


def test_zeros_and_k_above_nonzero_pairs():
    a = torch.zeros(7, 30)
    a[:, [2, 11, 29]] = torch.randn(7, 3)
    k = 30 * 29 // 2
    got = run(a, k)
    assert_matches_oracle(got, a, k)
    assert int((got.rows >= 0).sum()) == 3
    assert_matches_oracle(run(a, k, cosine=True), a, k, cosine=True)
    zero = torch.zeros(4, 9)
    got = run(zero, 5)
    assert got.rows.tolist() == [-1] * 5 and got.values.abs().sum() == 0


def test_negative_correlations():
    base = torch.randn(12, 20)
    a = torch.cat([base, -base * 1.5], dim=1)  # columns i and i + 20 anti-correlated
    got = run(a, 20)
    assert_matches_oracle(got, a, 20)
    assert bool((got.values < 0).any())
    neg = -torch.rand(12, 25)  # all-negative input: every dot product positive
    assert_matches_oracle(run(neg, 30), neg, 30)
    assert_matches_oracle(run(a, 20, cosine=True), a, 20, cosine=True)


def test_non_contiguous_input():
    a = torch.randn(40, 11).t()  # [11, 40] with strides (1, 11)
    assert_matches_oracle(run(a, 25), a, 25)
    b = torch.randn(20, 90)[::2, 3:80]
    assert_matches_oracle(kernel.gram_topk_triton(b, 60), b, 60)


def test_even_tiles_larger_blocks():
    # m, n multiples of the blocks: the unmasked load path
    a = torch.randn(32, 64)
    assert_matches_oracle(kernel.gram_topk_triton(a, 50, block=32, block_k=16), a, 50)
    assert_matches_oracle(kernel.gram_topk_triton(a, 50, cosine=True, block=32, block_k=32), a, 50, True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("cosine", [False, True])
def test_tma_config_matches_pointer_loads(dtype, cosine):
    """config TMA=True (a's tiles through a tensor descriptor, padded with zeros by the unit where
    the pointer kernels mask): the same pairs on odd shapes (partial tiles in m and n), ties and
    zero columns, through the histogram stage too."""
    a = torch.relu(torch.randn(37, 72)).round().to(dtype)  # integers: ties everywhere
    a[:, 5:9] = 0
    k = 300
    for extra in (dict(), dict(margin=0.01)):  # the sample's pass, then a sample that forces the histogram
        want = kernel.gram_topk_triton(a, k, cosine, block=32, block_k=16, **extra)
        got = kernel.gram_topk_triton(a, k, cosine, block=32, block_k=16, config=dict(TMA=True), **extra)
        assert_identical(want, got)
    assert kernel.last_call_info["stages"] == ["sample", "histogram"]
    assert_matches_oracle(got, a.float(), k, cosine)


def test_tma_config_needs_aligned_rows():
    a = torch.randn(20, 37)[:, :35]  # rows of 37 floats: 148 bytes, not a multiple of 16
    with pytest.raises(ValueError, match="TMA=True needs"):
        kernel.gram_topk_triton(a, 10, config=dict(TMA=True))
    assert_matches_oracle(kernel.gram_topk_triton(a, 10), a, 10)


def test_warm_start_hint_one_pass():
    a = torch.randn(10, 60)
    k = 40
    cold = run(a, k)
    kth = float(cold.values[-1].abs())
    warm = run(a, k, threshold=torch.tensor(kth))
    assert kernel.last_call_info["stages"] == ["hint"] and kernel.last_call_info["passes"] == 1
    assert_identical(cold, warm)


def test_retry_hint_too_high():
    a = torch.randn(10, 60)
    got = kernel.gram_topk_triton(a, 40, threshold=1e30)
    assert kernel.last_call_info["stages"] == ["hint", "sample"]
    assert kernel.last_call_info["passes"] == 2
    assert_matches_oracle(got, a, 40)


def test_retry_buffer_too_small():
    a = torch.randn(10, 60)
    got = kernel.gram_topk_triton(a, 40, capacity=3)
    info = kernel.last_call_info
    assert info["passes"] == 2 and info["capacity"] == info["candidates"] > 3
    assert_matches_oracle(got, a, 40)


def test_retry_stale_hint_too_low():
    # a stale hint far below the k-th score floods the buffer beyond what a retry may allocate
    a = torch.randn(10, 60)
    got = kernel.gram_topk_triton(a, 40, threshold=1e-6, capacity=50, max_capacity=100)
    info = kernel.last_call_info
    assert info["stages"][0] == "hint" and len(info["stages"]) >= 2 and info["passes"] >= 2
    assert_matches_oracle(got, a, 40)


@pytest.mark.parametrize("cosine", [False, True])
def test_retry_histogram_fallback(cosine):
    # a hopeless sample estimate (margin far below 1) leaves the exact histogram stage
    a = torch.randn(10, 70)
    got = kernel.gram_topk_triton(a, 100, cosine, margin=0.01)
    info = kernel.last_call_info
    assert info["stages"] == ["sample", "histogram"] and info["passes"] == 3
    assert info["candidates"] >= 100
    assert_matches_oracle(got, a, 100, cosine)


def test_histogram_fallback_when_few_nonzero_pairs():
    a = torch.zeros(5, 40)
    a[:, :6] = torch.randn(5, 6)
    k = 200  # only 15 non-zero pairs
    got = kernel.gram_topk_triton(a, k, threshold=1e9, margin=1e-3)
    assert kernel.last_call_info["threshold"] == 0.0
    assert_matches_oracle(got, a, k)


def test_deterministic():
    a = torch.randint(-1, 2, (8, 50)).to(torch.bfloat16)
    first = run(a, 100)
    assert_identical(first, run(a, 100))
    assert_identical(first, kernel.gram_topk_triton(a, 100, capacity=7))  # another path, same answer


def test_backward_matches_reference():
    a = torch.randn(6, 24, requires_grad=True)
    for similarity in ("dot", "cosine"):
        got = aosae.gram_topk(a, 30, similarity=similarity, backend="triton")
        (ga,) = torch.autograd.grad(got.values.abs().sum(), a)
        ref = aosae.gram_topk(a, 30, similarity=similarity, backend="reference")
        (gr,) = torch.autograd.grad(ref.values.abs().sum(), a)
        torch.testing.assert_close(ga, gr)


def test_float64_rejected_with_reason():
    a = torch.randn(4, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        run(a, 3)
    with pytest.raises(TypeError, match="float64"):
        kernel.gram_topk_triton(a, 3)


@pytest.mark.parametrize("n", [50, 70000])
def test_select_topk_equals_finalize(n):
    # candidates as the kernel leaves them: unique pairs, non-zero values, arbitrary order, ties
    from aosae.ops.conventions import finalize

    p = 400
    flat = torch.randperm(min(n * n, 10**6))[:p]
    rows, cols = flat // n, flat % n
    rows, cols = torch.minimum(rows, cols), torch.maximum(rows, cols)
    uniq = rows != cols
    rows, cols = rows[uniq].int(), cols[uniq].int()
    pairs = torch.unique(rows.long() * n + cols.long())
    rows, cols = (pairs // n).int(), (pairs % n).int()
    perm = torch.randperm(rows.numel())
    rows, cols = rows[perm], cols[perm]
    values = torch.randint(-6, 7, (rows.numel(),)).float()
    values[values == 0] = 0.5
    # k < p/4: the radix select first; p/4 <= k < p: one sort of all (the Triton pass's buffer)
    for k in (1, 17, rows.numel() // 4 + 1, rows.numel() // 3, rows.numel(), rows.numel() + 9):
        got = select_topk(values, rows, cols, k, n)
        assert_identical(got, finalize(values, rows, cols, k))


def test_cpu_tensor_needs_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    a = torch.randn(4, 6)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        run(a, 3)
    with pytest.raises(ValueError, match="CUDA"):
        kernel.gram_topk_triton(a, 3)


def test_gpu_benchmark_dry_run(tmp_path):
    # the GPU benchmark's code paths (timing, checks vs reference, JSON rows, plot) on CPU
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_gram_topk.py"
    spec = importlib.util.spec_from_file_location("gpu_gram_topk", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--device", "cpu", "--quick", "--dtypes", "bf16", "--sizes", "40", "--out-dir", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "cpu-interpreter-quick.json").read_text())
    assert {r["backend"] for r in rows} == {"gemm", "reference", "triton", "triton_cold"}
    keys = {"backend", "m", "n", "k", "dtype", "ms", "peak_mib", "passes", "device", "torch", "triton", "date"}
    assert all(keys <= set(r) for r in rows)
    assert all(r["ms"] > 0 for r in rows)
