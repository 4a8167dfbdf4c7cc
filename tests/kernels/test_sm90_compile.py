"""The SSD kernels, the conv forward and the gated-norm backward compile for Hopper (sm_90a) with
the installed Triton and its ptxas, on the CPU.

The interpreter runs a kernel's Python, not Triton's compiler: a construct that the compiler
rejects (or that only one schedule reaches) would first show on the GPU machine. Each combination
of schedule flags of each of these autotuned kernels is compiled once (bench/kernels_static.py
--one-per-schedule: the presets' shapes, bf16, documents on), in a process without
TRITON_INTERPRET so that the launchers hold their whole config lists.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

ROOT = Path(__file__).resolve().parents[2]
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(not PTXAS.exists(), reason="this Triton has no bundled ptxas")
def test_every_schedule_of_the_ssd_kernels_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "kernels_static.py"), "--one-per-schedule"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    kernels = {row.split("|")[1].strip() for row in rows}
    assert {"chunk_scan", "chunk_states", "dprev", "dx", "dcb", "dbc", "conv_fwd", "norm_bwd"} <= kernels, proc.stdout
    assert all("registers" not in row and int(row.split("|")[6]) > 0 for row in rows), proc.stdout


def test_sass_loops_counts_loop_steps_and_skipped_blocks():
    """bench/sass_loops.sass_loops on a hand-written nvdisasm-style listing: one loop of 6
    instructions (label at index 1, backward branch at 6) holding a forward branch that skips 2, and
    a branch out of the loop that is not a loop."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from sass_loops import sass_loops
    finally:
        sys.path.remove(str(ROOT / "bench"))
    listing = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   FADD R2, R2, R3 ;
        /*0020*/               @P0 BRA `(.L_x_2) ;
        /*0030*/                   FMUL R2, R2, R4 ;
        /*0040*/                   FMUL R2, R2, R5 ;
.L_x_2:
        /*0050*/                   MUFU.EX2 R2, R2 ;
        /*0060*/               @P1 BRA `(.L_x_1) ;
        /*0070*/               @P2 BRA `(.L_x_3) ;
        /*0080*/                   EXIT ;
.L_x_3:
        /*0090*/                   BRA `(.L_x_3);
"""
    assert sass_loops(listing) == [(1, 6, [(2, 2)]), (9, 9, [])]


@pytest.mark.parametrize("kernel, registers, warps, shared, limits", [
    # ncu's Launch Statistics / Occupancy of the SSD kernels on an H100 (bench/NOTES_kernels.md Run 15):
    # registers per thread, dynamic shared memory, and its "Block Limit Registers / Shared Mem". (Not
    # dx: registers allow it 2 programs, so the driver gave it a 132 KiB carveout, where ncu's shared
    # limit is 2; programs_per_sm counts with the largest, 4.)
    ("chunk scan, M64/K64/N128", 126, 4, 65536, (4, 3)),
    ("chunk scan, M64/K32/N64", 112, 4, 49152, (4, 4)),
    ("dCB, split decay", 121, 8, 98304, (2, 2)),
    ("dB/dC", 255, 4, 114688, (2, 2)),
])
def test_programs_per_sm_agrees_with_ncu(kernel, registers, warps, shared, limits):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from occupancy import programs_per_sm
    finally:
        sys.path.remove(str(ROOT / "bench"))
    assert programs_per_sm(registers, warps, shared) == limits, kernel
