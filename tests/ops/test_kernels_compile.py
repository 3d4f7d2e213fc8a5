"""Every Triton kernel compiles for an H100/H200 (sm_90) with its GPU launch configuration.

The other Triton tests run the kernels through the interpreter, which accepts code the compiler
rejects (a loop-carried value that changes type, a mixed-width atomic, ...). Compiling needs
no GPU: Triton ships ptxas, so benchmarks/kernel_resources.py (the list of kernels and their
launch parameters) builds every cubin here, in a subprocess without TRITON_INTERPRET.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install 'aosae[triton]')")

REPO = Path(__file__).resolve().parents[2]


def test_every_kernel_compiles_for_sm90(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    out = tmp_path / "resources.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "kernel_resources.py"), "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    if done.returncode and "no ptxas" in done.stderr:
        pytest.skip("this Triton install has no ptxas to compile with")
    assert done.returncode == 0, f"a kernel failed to compile for sm_90:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    rows = json.loads(out.read_text())[1:]
    assert len(rows) >= 16 and all(row["registers"] for row in rows), rows
