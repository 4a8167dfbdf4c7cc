"""Loops in an nvdisasm listing (SASS) and what a step through each costs, in instructions:
bench/kernels_static.py --loops. No GPU needed; pure text processing of the listing."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path


def sass_loops(sass: str) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """nvdisasm listing -> [(first, last, [(branch, skipped)])]: each loop as the instruction indices
    of its head (a label) and its backward branch, with the forward branches inside it and how many
    instructions each jumps over. A loop step that takes such a branch costs last - first + 1 -
    skipped instructions."""
    ins, labels = 0, {}
    branches = []  # (index, target label)
    for line in sass.splitlines():
        label = re.match(r"^\s*\.(L\w+):", line)
        if label:
            labels[label.group(1)] = ins
        elif re.match(r"^\s*/\*[0-9a-f]+\*/\s+\S", line):
            target = re.search(r"BRA\s+`?\(?\.(L\w+)", line)
            if target:
                branches.append((ins, target.group(1)))
            ins += 1
    loops = []
    for at, name in branches:
        head = labels.get(name)
        if head is not None and head <= at:
            inner = [(b, labels[t] - b - 1) for b, t in branches
                     if head <= b < at and t in labels and b < labels[t] <= at + 1]
            loops.append((head, at, inner))
    return loops


def print_loops(name: str, cubin: bytes, nvdisasm: Path) -> None:
    """Print each loop of a compiled kernel (its cubin, disassembled by nvdisasm) as sass_loops sees it."""
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        sass = subprocess.run([str(nvdisasm), "-c", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    for head, last, inner in sass_loops(sass):
        skips = ", ".join(f"a branch at +{b - head} skips {n}" for b, n in inner) or "no branch inside"
        print(f"  {name}: loop of {last - head + 1} instructions ({skips})")
