"""Where a kernel's warps wait: the warp-stall samples of an Nsight Compute source export, summed per
kernel by reason and listed per SASS instruction.

On the GPU machine (bench/NOTES_kernels.md Run 15 read the SSD kernels this way):
    ncu --clock-control none --profile-from-start off --kernel-name regex:"chunk_scan_fwd|chunk_dx" \
        --section WarpStateStats --section SourceCounters -f -o stalls \
        python bench/ssd_once.py 2 8192 128 64 8 128
    ncu --import stalls.ncu-rep --page source --csv --print-source sass > stalls_sass.csv
Then anywhere:
    python bench/ncu_stalls.py stalls_sass.csv [--top 25] [--kernel chunk_scan] [--around 834 --context 40]

For each kernel: the share of all stall samples per reason (ncu's `stall_*` columns, the "Not Issued"
ones left out), then the instructions with the most samples, each with its three main reasons. A
warp is sampled at the instruction it waits to issue, which is the consumer of the slow producer: a
barrier after cp.async copies, an FADD after a global load. `--around I` prints the instructions
before and after index I (with their execution counts) to find that producer.
"""

from __future__ import annotations

import argparse
import collections
import csv
import sys

ALL = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"


def parse(path: str) -> dict[str, list[dict[str, str]]]:
    """kernel name -> its SASS rows (column name -> value), in address order. The export holds one
    block per kernel: a `"Kernel Name",name` line, a header line starting with "Address", the rows."""
    kernels: dict[str, list[dict[str, str]]] = {}
    current, header = None, None
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if not row:
                continue
            if row[0] == "Kernel Name":
                current, header = row[1], None
                kernels.setdefault(current, [])
            elif row[0] == "Address":
                header = row
            elif current is not None and header is not None:
                kernels[current].append(dict(zip(header, row)))
    if not kernels:
        raise SystemExit(f"{path}: no kernel blocks (expected `ncu --import ... --page source --csv "
                         f"--print-source sass` output)")
    return kernels


def _int(value: str | None) -> int:
    return int(value.replace(",", "")) if value and value.strip() not in ("", "-") else 0


def reasons(rows: list[dict[str, str]]) -> list[str]:
    """The stall-reason columns of these rows (issued and not-issued samples together)."""
    return [c for c in (rows[0] if rows else {}) if c.startswith("stall_") and "Not Issued" not in c]


def by_reason(rows: list[dict[str, str]]) -> list[tuple[str, int, float]]:
    """[(reason, samples, share of all samples)], most samples first."""
    totals = collections.Counter()
    cols = reasons(rows)
    for r in rows:
        for c in cols:
            totals[c[len("stall_"):]] += _int(r.get(c))
    whole = sum(totals.values()) or 1
    return [(name, n, n / whole) for name, n in totals.most_common()]


def top_instructions(rows: list[dict[str, str]], n: int) -> list[tuple[int, int, str, list[tuple[str, int]]]]:
    """[(index, samples, SASS, [(reason, samples) x 3])] of the n instructions with most samples."""
    cols = reasons(rows)
    order = sorted(range(len(rows)), key=lambda i: -_int(rows[i].get(ALL)))[:n]
    out = []
    for i in order:
        main = sorted(((c[len("stall_"):], _int(rows[i].get(c))) for c in cols), key=lambda t: -t[1])[:3]
        out.append((i, _int(rows[i].get(ALL)), rows[i].get("Source", "").strip(), main))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv", help="ncu --import REP --page source --csv --print-source sass > this file")
    ap.add_argument("--top", type=int, default=20, help="instructions listed per kernel")
    ap.add_argument("--kernel", help="only kernels whose name contains this")
    ap.add_argument("--around", type=int, help="print the instructions around this index instead")
    ap.add_argument("--context", type=int, default=30, help="instructions before and after --around")
    args = ap.parse_args(argv)
    for name, rows in parse(args.csv).items():
        if args.kernel and args.kernel not in name:
            continue
        total = sum(_int(r.get(ALL)) for r in rows)
        print(f"== {name}: {len(rows)} instructions, {total} stall samples")
        if args.around is not None:
            lo, hi = max(0, args.around - args.context), min(len(rows), args.around + args.context + 1)
            for i in range(lo, hi):
                r = rows[i]
                print(f"  {i:5d} {_int(r.get(ALL)):7d} samples {_int(r.get(EXECUTED)):10d} executed  "
                      f"{r.get('Source', '').strip()}")
            continue
        for reason, n, share in by_reason(rows)[:10]:
            print(f"  {reason:22s} {n:9d} {100 * share:5.1f}%")
        print(f"  {'index':>5s} {'samples':>7s}  instruction  (main reasons)")
        for i, n, sass, main_reasons in top_instructions(rows, args.top):
            why = ", ".join(f"{r} {k}" for r, k in main_reasons if k)
            print(f"  {i:5d} {n:7d}  {sass[:70]:70s} ({why})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
