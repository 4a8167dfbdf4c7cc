"""Registers, spills and shared memory of every autotuner config of the SSD kernels (and of the conv
forward and the gated-norm backward), compiled for Hopper (sm_90a) by the installed Triton and its
bundled ptxas: no GPU needed.

A config that spills registers to local memory is slow whatever the tuner measures, and the
interpreter (the CPU tests) cannot show it. The last column is how many programs of a config fit
on an SM, by registers and by shared memory: a loop that Triton multi-buffers can make shared
memory the limit (bench/NOTES_kernels.md Run 15: the chunk scan's one-step dstate loop took 64 KB,
3 programs per SM where its registers allowed 4). Run it on the CPU with the GPU machine's Triton:
    python -m pip install --target /tmp/triton36 --no-deps triton==3.6.0
    PYTHONPATH=/tmp/triton36:$PWD python bench/kernels_static.py [--kernel chunk_scan]
`--loops` prints, for each kernel's fixed config, the SASS instruction count of every loop (a
backward branch) and of the blocks a forward branch inside it skips: the instructions a step costs
on each path (bench/NOTES_kernels.md Run 13 counts them per element of a decay matrix).
Shapes: headdim 64, dstate 128, chunk 256, bf16 inputs, documents (seq_idx) on: the presets'; the
conv at width 4 with bias and SiLU, the gated norm over one group of 4096 channels with z.
The first config of each list is the fixed one (kernels.deterministic) and the tuner's fallback.
Arguments are specialised as the JIT specialises them for contiguous inputs at those shapes (unit
strides and ngroups = 1 as constants, divisibility hints on the rest): without that, registers and
spills come out far higher than on the GPU, and some compiler failures do not show.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.pop("TRITON_INTERPRET", None)  # the autotuned launchers, not the interpreter's single config

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from occupancy import programs_per_sm  # noqa: E402  (this folder)
from sass_loops import print_loops  # noqa: E402  (this folder)
from kernels.conv1d import triton_op as conv  # noqa: E402
from kernels.rmsnorm_gated import triton_op as rms  # noqa: E402
from kernels.ssd import triton_bwd as bwd  # noqa: E402
from kernels.ssd import triton_bwd_dx as bwd_dx  # noqa: E402
from kernels.ssd import triton_fwd as fwd  # noqa: E402
from kernels.ssd import triton_states as states  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
Q, P, N = 256, 64, 128
BF16 = ("x_ptr", "dy_ptr", "z_ptr", "B_ptr", "C_ptr", "b_ptr", "c_ptr", "a_ptr", "out_ptr", "ypre_ptr", "dx_ptr",
        "prev_lp_ptr", "dS_lp_ptr")


def specs():
    """kernel name -> (jit function, launcher for chunk Q, fixed constexprs, extra pointer dtypes)."""
    common = dict(HAS_SEQ=True, DOT_PREC="tf32")
    return {
        "chunk_scan": (fwd._chunk_scan_fwd_kernel, fwd._chunk_scan_tuned(Q, N),
                       dict(common, HAS_D=True, HAS_Z=True, STORE_YPRE=True), {"prev_ptr": "*bf16"}),
        "chunk_states": (states._chunk_outer_kernel, states._chunk_outer_tuned(Q), dict(common, MODE=0, SPLIT=True), {}),
        "dprev": (states._chunk_outer_kernel, states._chunk_outer_tuned(Q), dict(common, MODE=1, SPLIT=True), {}),
        "dx": (bwd_dx._chunk_dx_kernel, bwd_dx._chunk_dx_tuned(Q),
               dict(common, HAS_D=True, BLOCK_J=min(128, Q), BLOCK_P=P, SPLIT=True), {}),
        "dcb": (bwd._chunk_dcb_kernel, bwd._chunk_dcb_tuned(Q), dict(common, BLOCK_I=64, BLOCK_J=64, HDIM_BLOCK=P), {}),
        "dbc": (bwd._chunk_dbc_kernel, bwd._chunk_dbc_tuned(Q), dict(common, BLOCK_N=64, HDIM_BLOCK=P),
                {"prev_ptr": "*fp32", "dS_ptr": "*bf16"}),
        "conv_fwd": (conv._conv_fwd_kernel, conv._conv_fwd_tuned,
                     dict(WIDTH=4, HAS_BIAS=True, HAS_SEQ=True, SILU=True), {"w_ptr": "*fp32", "bias_ptr": "*fp32"}),
        "norm_bwd": (rms._rms_bwd_kernel, rms._bwd_launcher(4096), dict(HAS_Z=True, NORM_BEFORE_GATE=False, BLOCK_G=4096),
                     {"y_ptr": "*bf16", "z_ptr": "*bf16", "dout_ptr": "*bf16", "dy_ptr": "*bf16", "dz_ptr": "*bf16"}),
    }


# integer arguments that are 1 at the presets' shapes (contiguous innermost dims, one group): the JIT
# compiles those as constants, and some Triton passes fail only on the code that results (the dCB
# kernel's pipeliner did, on the H100 only), so they are compiled as the JIT compiles them
ONES = re.compile(r"^(s_\w+_[pndk]|s_seq_l|ngroups)$")
NO_DIVISIBILITY = {"nsplit", "nblk_max", "rows_per_prog", "group_size", "heads_per_group"}


def compile_config(fn, constexprs, ptr_types, num_warps, num_stages, maxnreg=None):
    """Compile as the JIT does for contiguous inputs at the presets' shapes: pointers and the other
    integers (lengths, strides: multiples of 16 there) carry the divisibility-by-16 hint."""
    sig_params = inspect.signature(fn.fn).parameters
    params = list(sig_params)
    # meta-parameters a config leaves to the kernel's default (the JIT fills them in likewise)
    constexprs = {**{p: v.default for p, v in sig_params.items() if v.default is not inspect.Parameter.empty},
                  **constexprs}
    ones = {p: 1 for p in params if ONES.match(p) and p not in constexprs}
    sig = {p: ("constexpr" if p in constexprs or p in ones else
               ptr_types.get(p, "*bf16" if p in BF16 else "*i32" if p == "seq_ptr" else "*fp32") if p.endswith("_ptr")
               else "i32") for p in params}
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params)
             if sig[p] != "constexpr" and p not in NO_DIVISIBILITY}
    src = ASTSource(fn=fn, signature=sig, constexprs={(params.index(k),): v for k, v in {**constexprs, **ones}.items()},
                    attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    if maxnreg is not None:  # a config's register cap: ptxas meets it, spilling if it must
        options["maxnreg"] = maxnreg
    return triton.compile(src, target=TARGET, options=options)


def ptxas_report(ptx: str) -> tuple[int, int, int]:
    """-> (registers per thread, spill store bytes, spill load bytes) from ptxas -v."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        r = subprocess.run([str(PTXAS), "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                           capture_output=True, text=True, check=True)
    finally:
        os.unlink(f.name)
    regs = int(re.search(r"Used (\d+) registers", r.stderr).group(1))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr)
    return regs, int(spill.group(1)), int(spill.group(2))


FLAGS = ("SPLIT_DECAY", "HEAD_PIPE", "PREFETCH", "HEAD_STAGES")  # schedule flags that change a code path


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kernel", action="append", help="only these (default: all)")
    ap.add_argument("--one-per-schedule", action="store_true",
                    help="only the first config of each combination of schedule flags and pipeline stages (a quick "
                         "compile check: "
                         "tests/kernels/test_sm90_compile.py); exit status 1 if one fails to compile")
    ap.add_argument("--loops", action="store_true",
                    help="also print the SASS instruction counts of the fixed config's loops (Triton's nvdisasm)")
    args = ap.parse_args()
    errors = 0
    print(f"Triton {triton.__version__}, sm_90a; headdim {P}, dstate {N}, chunk {Q}, bf16, seq_idx on")
    print("| kernel | # | config | warps | stages | registers | spill st/ld B | shared KB | programs per SM "
          "(by registers, by shared memory) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (fn, launcher, fixed, ptrs) in specs().items():
        if args.kernel and name not in args.kernel:
            continue
        seen = set()
        for i, cfg in enumerate(launcher.tuned.configs):
            flags = (*(cfg.kwargs.get(f) for f in FLAGS), cfg.num_stages)  # the pipeliner depends on stages
            if args.one_per_schedule and flags in seen:
                continue
            seen.add(flags)
            kw = {k: v for k, v in cfg.kwargs.items() if k not in fixed}
            try:
                k = compile_config(fn, dict(fixed, **kw), ptrs, cfg.num_warps, cfg.num_stages, cfg.maxnreg)
                regs, st, ld = ptxas_report(k.asm["ptx"])
                by_regs, by_shared = programs_per_sm(regs, cfg.num_warps, k.metadata.shared)
                row = (f"{regs} | {st}/{ld}{' SPILLS' if st or ld else ''} | {k.metadata.shared / 1024:.1f} | "
                       f"{min(by_regs, by_shared)} ({by_regs}, {by_shared})")
            except Exception as e:  # a config that does not compile is a finding too
                errors += 1
                row = f"compile error: {type(e).__name__}: {str(e)[:2000]} | | | "
            desc = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in kw.items())
            desc += f",maxnreg={cfg.maxnreg}" if cfg.maxnreg is not None else ""
            print(f"| {name} | {i} | {desc} | {cfg.num_warps} | {cfg.num_stages} | {row} |", flush=True)
            if args.loops and i == 0 and "compile error" not in row:
                print_loops(name, k.asm["cubin"], PTXAS.with_name("nvdisasm"))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
