"""bench/ncu_stalls.py reads an Nsight Compute source export (`ncu --import REP --page source --csv
--print-source sass`): a small file in that layout, two kernels, known sample counts."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("ncu_stalls", ROOT / "bench" / "ncu_stalls.py")
ncu_stalls = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ncu_stalls)

HEADER = ('"Address","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued Samples)",'
          '"Instructions Executed","stall_barrier","stall_long_sb","stall_wait","stall_long_sb (Not Issued)"')
EXPORT = "\n".join([
    '"Kernel Name","_chunk_scan_fwd_kernel",',
    HEADER,
    '"0x10","      LDG.E R5, desc[UR16][R34.64]","2","0","1,024","0","0","2","0"',
    '"0x20","      BAR.SYNC.DEFER_BLOCKING 0x0","90","80","1,024","10","80","0","80"',
    '"0x30","      FADD R1, R2, -R3","8","1","1,024","0","3","5","3"',
    '',
    '"Kernel Name","_chunk_dx_kernel",',
    HEADER,
    '"0x10","      HGMMA.64x64x16.F32.BF16 R24, R56, gdesc[UR20], R24","5","0","512","0","0","5","0"',
])


@pytest.fixture()
def export(tmp_path):
    path = tmp_path / "stalls_sass.csv"
    path.write_text(EXPORT + "\n")
    return str(path)


def test_parse_and_shares(export):
    kernels = ncu_stalls.parse(export)
    assert list(kernels) == ["_chunk_scan_fwd_kernel", "_chunk_dx_kernel"]
    scan = kernels["_chunk_scan_fwd_kernel"]
    assert [r["Source"].strip().split()[0] for r in scan] == ["LDG.E", "BAR.SYNC.DEFER_BLOCKING", "FADD"]
    # "Not Issued" columns are a subset of the samples and stay out of the shares
    assert ncu_stalls.by_reason(scan) == [("long_sb", 83, 0.83), ("barrier", 10, 0.10), ("wait", 7, 0.07)]
    top = ncu_stalls.top_instructions(scan, 2)
    assert [(i, n) for i, n, _, _ in top] == [(1, 90), (2, 8)]
    assert top[0][3] == [("long_sb", 80), ("barrier", 10), ("wait", 0)]


def test_main_prints_the_table_and_the_context(export, capsys):
    assert ncu_stalls.main([export, "--kernel", "chunk_scan", "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert "_chunk_dx_kernel" not in out and "100 stall samples" in out
    assert "long_sb" in out and "83.0%" in out and "BAR.SYNC" in out
    ncu_stalls.main([export, "--kernel", "chunk_scan", "--around", "1", "--context", "1"])
    lines = capsys.readouterr().out.splitlines()[1:]
    assert len(lines) == 3 and "1024 executed" in lines[0] and "LDG.E" in lines[0]


def test_not_an_export(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text('"ID","Kernel Name"\n"0","k"\n')
    with pytest.raises(SystemExit, match="no kernel blocks"):
        ncu_stalls.parse(str(path))
