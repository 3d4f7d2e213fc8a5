"""Registers, spills and shared memory of every Triton kernel as compiled for an H100/H200 (sm_90a),
without a GPU: Triton compiles the kernel with the launch's specialisations (unit stride, 16-byte
aligned pointers and sizes), and its bundled ptxas reports the resources. Occupancy follows from
them: an SM has 64 K registers and 228 KiB of shared memory, so a 256-thread program using 255
registers or > 114 KiB runs one program per SM, and nothing overlaps its epilogue.

    python benchmarks/kernel_resources.py      # -> benchmarks/results/kernel-resources-sm90.json

tests/ops/test_kernels_compile.py runs it in CI: every kernel listed here must compile.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from gpu_gram_topk import import_aosae  # noqa: E402

import_aosae()
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from aosae.kernels import gram_topk as dense, sparse_coding as coding, sparse_pairs as sparse  # noqa: E402
from aosae.ops.backends import sparse_coding_triton as coding_host  # noqa: E402
from machine import RESULTS, today, write_rows  # noqa: E402

TILES = {"a_ptr": "*bf16", "inv_norm_ptr": "*fp32", "tile_bi_ptr": "*i32", "tile_bj_ptr": "*i32",
         "M": "i32", "N": "i32", "stride_m": "i32"}
COLLECT = {**TILES, "threshold": "fp32", "val_ptr": "*fp32", "row_ptr": "*i32", "col_ptr": "*i32",
           "counter_ptr": "*i64", "capacity": "i64"}
DENSE_FLAGS = dict(COSINE=False, EVEN_M=True, EVEN_N=True, CAST_FP32=False, IEEE=False, stride_n=1)
TMA_TILES = {"inv_norm_ptr": "*fp32", "tile_bi_ptr": "*i32", "tile_bj_ptr": "*i32", "M": "i32", "N": "i32"}
TMA_COLLECT = {**TMA_TILES, **{name: COLLECT[name] for name in ("threshold", "val_ptr", "row_ptr", "col_ptr",
                                                                 "counter_ptr", "capacity")}}
TMA_FLAGS = dict(COSINE=False, CAST_FP32=False, IEEE=False)
EMIT = {"row_ptr": "*i64", "cols_ptr": "*i64", "vals_ptr": "*bf16", "pair_off_ptr": "*i64", "tile_row_ptr": "*i32",
        "tile_i_ptr": "*i32", "tile_j_ptr": "*i32", "n": "i32", "prods_ptr": "*fp32"}
REDUCE = {"sprods_ptr": "*fp32", "P": "i64", "n": "i32", "sums_ptr": "*fp32", "sel_ptr": "*i32", "norm_sq_ptr": "*fp32"}
SCORE = {"sums_ptr": "*fp32", "norm_sq_ptr": "*fp32", "P": "i64", "n": "i32", "sel_ptr": "*i32"}
SEGMENT = {"offsets_ptr": "*i64", "idx_ptr": "*i64", "w_ptr": "*fp32", "order_ptr": "*i64", "out_ptr": "*fp32",
           "S": "i32", "d": "i32", "stride_table": "i32", "stride_out": "i32"}
DOT = {"rows_a_ptr": "*i64", "rows_b_ptr": "*i64", "out_ptr": "*fp32", "nnz": "i64", "d": "i32", "stride_a": "i32",
       "stride_b": "i32"}
# sizes a launch passes as multiples of 16 (Triton specialises them): the Gram's M, N, stride; the SAE's d_in
# (576, 2304, 4096: every width trained) and the row strides that follow from it
ALIGNED = ("M", "N", "stride_m", "d", "stride_table", "stride_out", "stride_a", "stride_b")
# (name, kernel, argument types, constexprs, num_warps, num_stages): every kernel with the launch
# parameters of its host side (triton_driver._config, sparse_triton), both key widths, dot and cosine
KERNELS = [
    ("collect (shipped config)", dense._collect_kernel, COLLECT, dict(DENSE_FLAGS, BLOCK=128, BLOCK_K=128), 8, 3),
    ("collect, cosine", dense._collect_kernel, COLLECT, dict(DENSE_FLAGS, COSINE=True, BLOCK=128, BLOCK_K=128), 8, 3),
    ("collect BLOCK_K 64 (the first H200 runs' default)", dense._collect_kernel, COLLECT,
     dict(DENSE_FLAGS, BLOCK=128, BLOCK_K=64), 8, 3),
    ("collect BLOCK_K 32, 4 stages", dense._collect_kernel, COLLECT, dict(DENSE_FLAGS, BLOCK=128, BLOCK_K=32), 8, 4),
    ("collect BLOCK 64", dense._collect_kernel, COLLECT, dict(DENSE_FLAGS, BLOCK=64, BLOCK_K=64), 4, 4),
    ("histogram (same main loop, no compaction)", dense._histogram_kernel, {**TILES, "hist_ptr": "*i64"},
     dict(DENSE_FLAGS, BLOCK=128, BLOCK_K=128, SHIFT=dense.HIST_SHIFT, NUM_BINS=dense.HIST_BINS), 8, 3),
    # a's tiles through a tensor descriptor (TMA): the tuning's two TMA configs (bf16), fp32's tiles, the histogram
    *[(f"collect TMA ({dt}, BLOCK_K {bk}, {st} stages)", dense._collect_tma_kernel,
       {**TMA_COLLECT, "a_desc": f"tensordesc<{dt}[{bk}, 128]>"}, dict(TMA_FLAGS, BLOCK=128, BLOCK_K=bk), 8, st)
      for dt, bk, st in (("bf16", 128, 3), ("bf16", 64, 4), ("fp32", 32, 3))],
    ("histogram TMA (bf16, BLOCK_K 128)", dense._histogram_tma_kernel,
     {**TMA_TILES, "a_desc": "tensordesc<bf16[128, 128]>", "hist_ptr": "*i64"},
     dict(TMA_FLAGS, BLOCK=128, BLOCK_K=128, SHIFT=dense.HIST_SHIFT, NUM_BINS=dense.HIST_BINS), 8, 3),
    *[(f"sparse emit ({bits} keys{', diagonal' if diag else ''})", sparse._emit_kernel,
       {**EMIT, "keys_ptr": f"*{bits}"}, dict(DIAG=diag, KEY32=bits == "i32", BLOCK=64), 8, 3)
      for bits in ("i32", "i64") for diag in (False, True)],
    *[(f"sparse reduce ({bits} keys{', cosine' if cosine else ''})", sparse._reduce_kernel,
       {"skeys_ptr": f"*{bits}", **REDUCE}, dict(COSINE=cosine, KEY32=bits == "i32", BLOCK=1024, CHUNK=8), 4, 3)
      for bits in ("i32", "i64") for cosine in (False, True)],
    *[(f"sparse cosine score ({bits} keys)", sparse._cosine_score_kernel, {"skeys_ptr": f"*{bits}", **SCORE},
       dict(KEY32=bits == "i32", BLOCK=1024), 4, 3) for bits in ("i32", "i64")],
    ("sparse table home slots", sparse._table_home_kernel,
     {"keys_ptr": "*i64", "K": "i32", "home_ptr": "*i64", "mask_bits": "i64"}, dict(SHIFT=40, BLOCK=1024), 4, 3),
    ("sparse support grad", sparse._support_grad_kernel,
     {"row_ptr": "*i64", "cols_ptr": "*i64", "y_ptr": "*fp32", "work_row_ptr": "*i32", "work_blk_ptr": "*i32",
      "n": "i32", "table_keys_ptr": "*i64", "table_g_ptr": "*fp32", "mask_bits": "i64", "grad_ptr": "*fp32"},
     dict(SHIFT=40, BLOCK=32), 4, 3),
    # the sparse SAE step (sparse_coding_triton's SEGMENT_CONFIG / DOT_CONFIG): every table dtype
    *[(f"sparse coding segment sum ({dt} table{', longest first' if ordered else ''})",
       coding._segment_gather_sum_kernel, {**SEGMENT, "table_ptr": f"*{dt}"},
       dict(ORDERED=ordered, BLOCK_S=coding_host.SEGMENT_CONFIG[0], BLOCK_D=coding_host.SEGMENT_CONFIG[1]),
       coding_host.SEGMENT_CONFIG[2], 3) for dt in ("fp32", "bf16", "fp16") for ordered in (False, True)],
    *[(f"sparse coding gathered dot ({da} A, {db} B)", coding._gathered_dot_kernel,
       {**DOT, "a_ptr": f"*{da}", "b_ptr": f"*{db}"},
       dict(BLOCK_E=coding_host.DOT_CONFIG[0], BLOCK_D=coding_host.DOT_CONFIG[1]), coding_host.DOT_CONFIG[2], 3)
      for da, db in (("fp32", "fp32"), ("bf16", "bf16"), ("fp32", "bf16"), ("fp16", "fp16"))],
]


def ptxas() -> str:
    """Triton's ptxas that reads the PTX version this Triton emits (the newest bundled one)."""
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for name in ("ptxas-blackwell", "ptxas"):
        if (bin_dir / name).exists():
            return str(bin_dir / name)
    raise SystemExit(f"no ptxas under {bin_dir}: this Triton install cannot compile for NVIDIA GPUs")


def resources(fn, types: dict, const: dict, warps: int, stages: int, tmp: Path) -> dict:
    sig = {**types, **{name: "constexpr" for name in const}}
    # attrs are keyed by the argument's position in the kernel, not in this dict
    aligned = [fn.arg_names.index(name) for name in sig if sig[name].startswith("*") or name in ALIGNED]
    kernel = triton.compile(
        ASTSource(fn=fn, signature=sig, constexprs=const, attrs={(i,): [["tt.divisibility", 16]] for i in aligned}),
        target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages},
    )
    ptx = tmp / "k.ptx"
    ptx.write_text(kernel.asm["ptx"])
    report = subprocess.run([ptxas(), "-arch=sm_90a", "-v", str(ptx), "-o", str(tmp / "k.cubin")],
                            capture_output=True, text=True).stderr
    number = lambda pattern: int(m.group(1)) if (m := re.search(pattern, report)) else None  # noqa: E731
    return dict(registers=number(r"Used (\d+) registers"), spill_store_bytes=number(r"(\d+) bytes spill stores"),
                spill_load_bytes=number(r"(\d+) bytes spill loads"), shared_bytes=kernel.metadata.shared,
                layout_conversions=kernel.asm["ttgir"].count("ttg.convert_layout"), num_warps=warps, num_stages=stages)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=RESULTS / "kernel-resources-sm90.json")
    args = p.parse_args(argv)
    rows = [dict(target="sm_90a", triton=triton.__version__, date=today(), command=" ".join(sys.argv))]
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TRITON_CACHE_DIR"] = str(Path(tmp) / "cache")
        for name, fn, types, const, warps, stages in KERNELS:
            row = {"kernel": name, **resources(fn, types, const, warps, stages, Path(tmp))}
            print(json.dumps(row), flush=True)
            rows.append(row)
    write_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
