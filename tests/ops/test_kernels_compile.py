"""Every Triton kernel compiles for an H100/H200 (sm_90) with its GPU launch configuration.

The other Triton tests run the kernels through the interpreter, which accepts code the compiler
rejects (a loop-carried value that changes type, a mixed-width atomic, ...). Compiling needs
no GPU: Triton ships ptxas, so a subprocess without TRITON_INTERPRET builds the cubins here.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install 'aosae[triton]')")

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent('''
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from aosae.kernels import gram_topk as G, sparse_pairs as K

    target = GPUTarget("cuda", 90, 32)

    def build(fn, sig, const, warps, stages=3):
        sig = {**sig, **{name: "constexpr" for name in const}}
        triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=target,
                       options={"num_warps": warps, "num_stages": stages})
        print("compiled", fn.__name__, const, flush=True)

    # the dense kernels, with the driver's GPU configuration (kernels/gram_topk.py _config)
    tiles = {"a_ptr": "*bf16", "inv_norm_ptr": "*fp32", "tile_bi_ptr": "*i32", "tile_bj_ptr": "*i32",
             "M": "i32", "N": "i32", "stride_m": "i32", "stride_n": "i32"}
    for cosine in (False, True):
        flags = dict(COSINE=cosine, BLOCK=128, BLOCK_K=64, EVEN_M=True, EVEN_N=True, CAST_FP32=False, IEEE=False)
        build(G._collect_kernel, {**tiles, "threshold": "fp32", "val_ptr": "*fp32", "row_ptr": "*i32",
                                  "col_ptr": "*i32", "counter_ptr": "*i64", "capacity": "i64"}, flags, 8)
    build(G._histogram_kernel, {**tiles, "hist_ptr": "*i64"},
          dict(COSINE=False, BLOCK=128, BLOCK_K=64, EVEN_M=False, EVEN_N=False, CAST_FP32=False, IEEE=False,
               SHIFT=G.HIST_SHIFT, NUM_BINS=G.HIST_BINS), 8)
    # the sparse kernels, with aosae/ops/backends/sparse_triton.py's launch parameters
    for diag in (False, True):
        for key32 in (False, True):
            build(K._emit_kernel, {"row_ptr": "*i64", "cols_ptr": "*i64", "vals_ptr": "*bf16", "pair_off_ptr": "*i64",
                                   "tile_row_ptr": "*i32", "tile_i_ptr": "*i32", "tile_j_ptr": "*i32", "n": "i32",
                                   "keys_ptr": "*i32" if key32 else "*i64", "prods_ptr": "*fp32"},
                  dict(DIAG=diag, KEY32=key32, BLOCK=64), 8)
            build(K._reduce_kernel, {"skeys_ptr": "*i32" if key32 else "*i64", "sprods_ptr": "*fp32", "P": "i64",
                                     "n": "i32", "sums_ptr": "*fp32", "sel_ptr": "*i32", "norm_sq_ptr": "*fp32"},
                  dict(COSINE=diag, KEY32=key32, BLOCK=1024, CHUNK=8), 4)
        build(K._cosine_score_kernel, {"skeys_ptr": "*i32" if diag else "*i64", "sums_ptr": "*fp32",
                                       "norm_sq_ptr": "*fp32", "P": "i64", "n": "i32", "sel_ptr": "*i32"},
              dict(KEY32=diag, BLOCK=1024), 4)
    build(K._table_insert_kernel, {"keys_ptr": "*i64", "g_ptr": "*fp32", "K": "i32", "table_keys_ptr": "*i64",
                                   "table_g_ptr": "*fp32", "mask_bits": "i64"}, dict(SHIFT=40, BLOCK=1024), 4)
    build(K._support_grad_kernel, {"row_ptr": "*i64", "cols_ptr": "*i64", "y_ptr": "*fp32", "work_row_ptr": "*i32",
                                   "work_blk_ptr": "*i32", "n": "i32", "table_keys_ptr": "*i64", "table_g_ptr": "*fp32",
                                   "mask_bits": "i64", "grad_ptr": "*fp32"}, dict(SHIFT=40, BLOCK=32), 4)
    print("all compiled")
''')


def test_every_kernel_compiles_for_sm90(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
               TRITON_DEFAULT_FP_FUSION="1")
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    if done.returncode and "ptxas" in done.stderr and "not found" in done.stderr.lower():
        pytest.skip("this Triton install has no ptxas to compile with")
    assert done.returncode == 0, f"a kernel failed to compile for sm_90:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    assert "all compiled" in done.stdout
