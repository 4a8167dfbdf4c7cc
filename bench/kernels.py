"""Kernel benchmark: one command on the GPU machine prints one table.

    PYTHONPATH=$PWD python bench/kernels.py [--no-ref] [--breakdown] [--claim] [--chunk-sweep] [--splits] [--order]
        [--configs [scan dx states dprev dcb dbc]] [--first-call PRESET]

For each SSD shape of issue 3's target table (bf16, chunk 256, D and dt_bias, no z): forward and
forward+backward median time (triton.testing.do_bench, CUDA events, median), achieved TFLOP/s
and GB/s against the measured ceilings (a large bf16 matmul and a device-to-device copy), the
PyTorch reference (kernels.ssd.reference) for comparison, and causal FlashAttention (torch SDPA,
32 heads x 128) at the same batch x seqlen. Then conv1d and gated RMSNorm at mixer sizes.
The last two columns time the same calls replayed from a CUDA graph (triton.testing.do_bench_cudagraph:
no host launch overhead, and no L2 flush between repetitions): the GPU's own time for the op, which
is what a step costs when the host runs ahead of the GPU, as in training. The first columns include
the host's time to launch the op's ~11 kernels and ~30 small torch ops, which dominates at small shapes.
`--breakdown` adds each SSD kernel's time, and the time of every launch schedule the autotuner
picks from for the gated-norm backward and the conv forward at the presets' mixer sizes (the
first schedule is the fixed one: the A/B of each autotuned list in one run), and dCB + dB/dC at
every split of a group's heads over programs; `--splits` times only those, also at the presets' shapes.
`--order` times only the chunk scan and dx in both launch orders (kernels._triton_utils.head_chunk_grid);
`--configs` only those two, the chunk-states kernel (forward chunk states, backward dprev), dCB and
dB/dC at every config of their autotuning lists (with `--write-tuned`, the tuned rows' choices are
recorded); both sweeps live in bench/kernel_configs.py. `--first-call hybrid_460m` prints only the
start-up cost (compile + autotuning) of the first SSD, conv and norm calls at a preset's shape.

FLOP model of the SSD (useful work, causal halves counted once):
  fwd = 2*T*H*P*N (chunk states) + 2*T*H*P*N (state read-out) + T*Q*H*P (intra-chunk, causal)
        + T*Q*G*N (C.B, causal)                      T = batch*seqlen, Q = chunk
  fwd+bwd = 3 x fwd.
Bytes (fewest): fwd reads x, dt, B, C and writes y; bwd also reads dy and writes dx, ddt, dB, dC.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# run as a script, this file's folder comes first on sys.path and its name would shadow the package
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402
import triton  # noqa: E402

import kernels  # noqa: E402
from kernels._triton_utils import record_tuning, write_tuned_table  # noqa: E402
from kernels.conv1d.reference import causal_conv1d as conv_ref
from kernels.rmsnorm_gated.reference import rmsnorm_gated as rms_ref
from kernels.ssd.reference import ssd_scan as ssd_ref

TARGETS = [  # (batch, seqlen, nheads, headdim, ngroups, dstate, target fwd+bwd ms, target fwd ms)
    (2, 4096, 64, 64, 1, 128, 1.96, 0.57),
    (1, 16384, 64, 64, 1, 128, 2.04, 0.30),
    (2, 8192, 128, 64, 8, 128, 1.92, 0.62),
]
CHUNK_SWEEP = [  # (preset, (batch, seqlen, nheads, headdim, ngroups, dstate)): one mixer at its micro batch
    ("hybrid_460m", (8, 4096, 32, 64, 1, 128)),
    ("hybrid_1b3", (4, 4096, 64, 64, 1, 128)),
]


def bench(fn, grad_to_none=None):
    if not torch.cuda.is_available():  # the CPU smoke test of `breakdown` (interpreter): one timed call
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return triton.testing.do_bench(fn, warmup=25, rep=200, grad_to_none=grad_to_none, return_mode="median")


def bench_graph(fn, grad_to_none=None):
    """Median ms of fn replayed from a CUDA graph (see the module docstring); nan where the call
    cannot be captured (the reason printed once)."""
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=100, grad_to_none=grad_to_none, return_mode="median")
    except Exception as e:  # noqa: BLE001 - a capture failure is reported, not fatal to the table
        print(f"CUDA graph capture failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        torch.cuda.synchronize()
        return float("nan")


def timings(fwd, fwdbwd, leaves):
    """(fwd ms, fwd+bwd ms, the same two replayed from a CUDA graph); leaves: the gradients to reset."""
    return (bench(fwd), bench(fwdbwd, grad_to_none=leaves),
            bench_graph(fwd), bench_graph(fwdbwd, grad_to_none=leaves))


def ceilings():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = bench(lambda: a @ b)
    tflops = 2 * 8192**3 / ms / 1e9
    src = torch.randn(2**29, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    gbs = 2 * src.numel() * 2 / ms / 1e6
    return tflops, gbs


def ssd_flops(batch, seqlen, h, p, g, n, q):
    t = batch * seqlen
    return 4 * t * h * p * n + t * q * h * p + t * q * g * n


def ssd_bytes(batch, seqlen, h, p, g, n, elt=2, bwd=False):
    t = batch * seqlen
    fwd = elt * (2 * t * h * p + t * h + 2 * t * g * n)
    return fwd if not bwd else fwd + elt * (3 * t * h * p + t * h + 4 * t * g * n)


def ssd_inputs(batch, seqlen, h, p, g, n, dev="cuda", dt_=torch.bfloat16, grad=False) -> list[torch.Tensor]:
    """x, dt, A, B, C, D, dt_bias of the benchmark's SSD calls (x, dt, B, C in dt_; the rest float32)."""
    x = torch.randn(batch, seqlen, h, p, device=dev, dtype=dt_)
    dt = (torch.randn(batch, seqlen, h, device=dev) - 1).to(dt_)
    A = -torch.exp(torch.rand(h, device=dev) * 2 - 1)
    B = torch.randn(batch, seqlen, g, n, device=dev, dtype=dt_)
    C = torch.randn(batch, seqlen, g, n, device=dev, dtype=dt_)
    D = torch.randn(h, device=dev)
    bias = torch.randn(h, device=dev)
    return [t.requires_grad_(grad) for t in (x, dt, A, B, C, D, bias)]


def equal_documents(batch, seqlen, documents, dev) -> torch.Tensor | None:
    """seq_idx (batch, seqlen) int32 of `documents` equal documents per row, as training on packed
    data passes it; None for no documents."""
    if not documents:
        return None
    seq = torch.arange(seqlen, device=dev, dtype=torch.int32) * documents // seqlen
    return seq.expand(batch, seqlen).contiguous()


def ssd_case(batch, seqlen, h, p, g, n, with_ref, chunk=256):
    leaves = ssd_inputs(batch, seqlen, h, p, g, n, grad=True)
    x, dt, A, B, C, D, bias = leaves
    gy = torch.randn_like(x)
    rows = {}
    impls = [("triton", kernels.ssd_scan)] + ([("torch ref", ssd_ref)] if with_ref else [])
    for name, fn in impls:
        def fwd():
            with torch.no_grad():
                return fn(x, dt, A, B, C, chunk_size=chunk, D=D, dt_bias=bias)

        def fwdbwd():
            y = fn(x, dt, A, B, C, chunk_size=chunk, D=D, dt_bias=bias)
            y.backward(gy)

        try:
            rows[name] = timings(fwd, fwdbwd, leaves)
        except torch.OutOfMemoryError:
            rows[name] = (float("nan"),) * 4
        torch.cuda.empty_cache()
    return rows


def sdpa_case(batch, seqlen):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(batch, 32, seqlen, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    go = torch.randn_like(q)
    f = torch.nn.functional.scaled_dot_product_attention
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        def fwd():
            with torch.no_grad():
                return f(q, k, v, is_causal=True)

        def fwdbwd():
            f(q, k, v, is_causal=True).backward(go)

        return timings(fwd, fwdbwd, [q, k, v])


# the launches of one tuned forward + backward (the other rows time alternatives to some of them)
PIPELINE = ("fwd dt_cumsum", "fwd CB", "fwd chunk states", "fwd state passing", "fwd chunk scan", "bwd dprev",
            "bwd state passing", "bwd dx/ddt", "bwd dCB", "bwd dB/dC", "bwd dt tail")


def breakdown(batch, seqlen, h, p, g, n, q=256, dev="cuda", dt_=torch.bfloat16, splits_only=False):
    """Median time of each SSD kernel launch (forward and backward pieces) at one shape, called as
    kernels/ssd/triton_op.py calls them (tests/kernels/test_bench_kernels.py runs it on the CPU under
    the interpreter, so that a change there cannot leave this behind unnoticed). splits_only: only
    split_parts' rows (`--splits`)."""
    from kernels._triton_utils import dot_precision
    from kernels.ssd import triton_bwd as bwd
    from kernels.ssd import triton_bwd_dx as bwd_dx
    from kernels.ssd import triton_bwd_scan as bwd_scan
    from kernels.ssd import triton_fwd as fwd
    from kernels.ssd import triton_states as states

    prec = dot_precision(dt_)
    x, dt, A, B, C, D, bias = ssd_inputs(batch, seqlen, h, p, g, n, dev, dt_)
    dy = torch.randn_like(x)
    lim = (0.0, float("inf"))
    dtp, cs = fwd.dt_cumsum(dt, bias, A, q, True, lim)
    cb = fwd.compute_cb(C, B, None, q, prec)
    st = states.chunk_outer(x, B, dtp, cs, None, q, 0, prec)
    prev, prev_lp, final = states.state_pass(st, cs, None, None, seqlen, q, dt_)
    dprev = states.chunk_outer(dy, C, dtp, cs, None, q, 1, prec)
    dS, dS_lp, dinit, last = bwd_scan.state_pass_bwd(dprev, prev, final, None, cs, None, seqlen, q, dt_)
    dx, ddtp, dcs, dD = bwd_dx.chunk_dx(x, dy, D, B, cb, dS, dtp, cs, None, q, prec)
    # the head split the training backward takes at this shape (timed on the first call): the dCB
    # and dB/dC rows below run it
    k = bwd.head_split(x, dy, B, C, prev, dS_lp, dtp, cs, None, cb, q, prec)
    dcb, rows = bwd.chunk_dcb(x, dy, dtp, cs, None, cb, g, q, prec, nsplit=k)
    # as the training backward calls it: the float32 prev, rounded by the kernel as it loads it
    _, _, offd = bwd.chunk_dbc(x, dy, B, C, prev, dS_lp, dcb, dtp, cs, None, q, prec)
    if splits_only:
        return [(name, bench(fn)) for name, fn in split_parts(x, dy, B, C, prev, dS_lp, dtp, cs, cb, h, g, q, prec)]
    parts = [
        ("fwd dt_cumsum", lambda: fwd.dt_cumsum(dt, bias, A, q, True, lim)),
        ("fwd CB", lambda: fwd.compute_cb(C, B, None, q, prec)),
        ("fwd chunk states", lambda: states.chunk_outer(x, B, dtp, cs, None, q, 0, prec)),
        ("fwd state passing", lambda: states.state_pass(st, cs, None, None, seqlen, q, dt_)),
        ("fwd chunk scan", lambda: fwd.chunk_scan(cb, x, None, D, C, prev_lp, dtp, cs, None, q, False, prec)),
        # the fixed config (kernels.deterministic) against the tuned one above
        ("fwd chunk scan fixed", lambda: fwd.chunk_scan(cb, x, None, D, C, prev_lp, dtp, cs, None, q, False, prec,
                                                        config=0)),
        ("bwd dprev", lambda: states.chunk_outer(dy, C, dtp, cs, None, q, 1, prec)),
        ("bwd state passing", lambda: bwd_scan.state_pass_bwd(dprev, prev, final, None, cs, None, seqlen, q, dt_)),
        ("bwd dx/ddt", lambda: bwd_dx.chunk_dx(x, dy, D, B, cb, dS, dtp, cs, None, q, prec)),
        ("bwd dx/ddt fixed", lambda: bwd_dx.chunk_dx(x, dy, D, B, cb, dS, dtp, cs, None, q, prec, config=0)),
        ("bwd dCB", lambda: bwd.chunk_dcb(x, dy, dtp, cs, None, cb, g, q, prec, nsplit=k)),
        ("bwd dB/dC", lambda: bwd.chunk_dbc(x, dy, B, C, prev, dS_lp, dcb, dtp, cs, None, q, prec)),
        # the two loop structures the autotuner chooses between (each with its first config)
        ("bwd dCB blocked", lambda: bwd.chunk_dcb(x, dy, dtp, cs, None, cb, g, q, prec, head_pipe=False, nsplit=k)),
        ("bwd dCB head-pipe", lambda: bwd.chunk_dcb(x, dy, dtp, cs, None, cb, g, q, prec, head_pipe=True, nsplit=k)),
        ("bwd dCB head-pipe split", lambda: bwd.chunk_dcb(x, dy, dtp, cs, None, cb, g, q, prec, head_pipe=True,
                                                          split_decay=True, nsplit=k)),
        ("bwd dB/dC blocked", lambda: bwd.chunk_dbc(x, dy, B, C, prev, dS_lp, dcb, dtp, cs, None, q, prec,
                                                    head_pipe=False)),
        ("bwd dB/dC head-pipe", lambda: bwd.chunk_dbc(x, dy, B, C, prev, dS_lp, dcb, dtp, cs, None, q, prec,
                                                      head_pipe=True)),
        ("bwd dt tail", lambda: bwd_scan.dt_bwd(dcs, rows, offd, last, ddtp, dtp, dt, bias, A, True, lim)),
    ]
    parts += split_parts(x, dy, B, C, prev, dS_lp, dtp, cs, cb, h, g, q, prec)
    return [(name, bench(fn)) for name, fn in parts]


def split_parts(x, dy, B, C, prev, dS_lp, dtp, cs, cb, h, g, q, prec):
    """dCB then dB/dC with k programs sharing a group's heads, every dividing split k (float32
    partial sums of dCB, dB and dC k times over, summed afterwards): more programs against more
    partial-sum traffic. [(name, fn)], the default split marked."""
    from kernels.ssd import triton_bwd as bwd

    default = bwd._nsplit(h // g)
    return [(f"bwd dCB+dB/dC nsplit={k}{' (default)' if k == default else ''}",
             lambda k=k: bwd.chunk_dcb_dbc(x, dy, B, C, prev, dS_lp, dtp, cs, None, cb, q, prec, nsplit=k))
            for k in bwd.dividing_splits(h // g)]


def schedules(batch, seqlen, d_inner, conv_dim, dev="cuda", dt_=torch.bfloat16):
    """Median time of each launch schedule the autotuner chooses from (the first: the fixed one) and
    of its choice, for the gated-norm backward (one group of d_inner channels) and the conv forward
    (width 4, bias, SiLU, no seq_idx), at one mixer's sizes. -> [(name, ms, bytes moved at best)]."""
    from kernels.conv1d.triton_op import FWD_SCHEDULES, conv_forward
    from kernels.rmsnorm_gated.triton_op import bwd_schedules, rmsnorm_gated_bwd

    rows = batch * seqlen
    y = torch.randn(rows, d_inner, device=dev, dtype=dt_)
    z, go = torch.randn_like(y), torch.randn_like(y)
    w = torch.ones(d_inner, device=dev)
    v = y.float() * torch.nn.functional.silu(z.float())
    rstd = torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-5).contiguous()
    del v
    nbytes = 5 * y.numel() * y.element_size()  # y, z, dout in; dy, dz out

    def cfg(sch):
        kw = ",".join(f"{k}={int(v)}" for k, v in sch.kwargs.items())
        return f"{kw},w{sch.num_warps}"

    out = []
    for sch in [None] + bwd_schedules(triton.next_power_of_2(d_inner)):
        ms = bench(lambda: rmsnorm_gated_bwd(y, z, w, rstd, go, d_inner, False, schedule=sch))
        out.append((f"norm bwd {cfg(sch) if sch else 'tuned'}", ms, nbytes))
    del y, z, go
    x = torch.randn(batch, seqlen, conv_dim, device=dev, dtype=dt_)
    wc = torch.randn(conv_dim, 4, device=dev)
    bc = torch.randn(conv_dim, device=dev)
    nbytes = 2 * x.numel() * x.element_size()
    for sch in [None] + FWD_SCHEDULES:
        ms = bench(lambda: conv_forward(x, wc, bc, None, True, schedule=sch))
        out.append((f"conv fwd {cfg(sch) if sch else 'tuned'}", ms, nbytes))
    return out


def first_call_seconds(dev="cuda", ssd_shape=TARGETS[0][:6], mixer=(4, 4096, 4096, 4352), q=256,
                       dt_=torch.bfloat16, documents=0) -> str:
    """The start-up cost a training process pays once per kernel and shape key: the first SSD
    forward+backward (shape 1; `documents` equal documents per row: seq_idx, as training on packed
    data calls it) and the first mixer's conv and gated norm (hybrid_1b3's sizes: batch, seqlen,
    d_inner, conv channels), each compile and autotuning included, with the state of Triton's
    on-disk cache (a warm cache skips both: point TRITON_CACHE_DIR at a shared filesystem)."""
    from pathlib import Path

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    cache = Path(os.environ.get("TRITON_CACHE_DIR", Path.home() / ".triton" / "cache"))
    entries = sum(1 for _ in cache.rglob("*")) if cache.exists() else 0
    t0 = time.perf_counter()
    x, dt, A, B, C, D, bias = ssd_inputs(*ssd_shape, dev, dt_, grad=True)
    seq = equal_documents(*ssd_shape[:2], documents, dev)
    kernels.ssd_scan(x, dt, A, B, C, chunk_size=q, D=D, dt_bias=bias, seq_idx=seq).backward(torch.randn_like(x))
    sync()
    t1 = time.perf_counter()
    mb, ml, d_inner, conv_dim = mixer
    xc = torch.randn(mb, ml, conv_dim, device=dev, dtype=dt_, requires_grad=True)
    kernels.causal_conv1d(xc, torch.randn(conv_dim, 4, device=dev), torch.randn(conv_dim, device=dev),
                          activation="silu").backward(torch.randn_like(xc))
    yr = torch.randn(mb, ml, d_inner, device=dev, dtype=dt_, requires_grad=True)
    kernels.rmsnorm_gated(yr, torch.randn_like(yr), torch.ones(d_inner, device=dev),
                          group_size=d_inner).backward(torch.randn_like(yr))
    sync()
    t2 = time.perf_counter()
    return (f"first calls (compile + autotuning; Triton cache {cache}: {entries} entries before): SSD f+b "
            f"{t1 - t0:.1f} s, conv1d + gated norm f+b {t2 - t1:.1f} s")


def emit(line: str) -> None:
    """A table row, printed at once: a run cut short by a time limit keeps the rows it measured."""
    print(line, flush=True)


def main():
    from bench.kernel_configs import SWEPT, config_sweep, config_table, launch_order

    ap = argparse.ArgumentParser()
    ap.add_argument("--no-ref", action="store_true", help="skip the PyTorch reference timings")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time each SSD kernel launch, and each launch schedule of the gated-norm "
                         "backward and the conv forward at the presets' mixer sizes")
    ap.add_argument("--claim", action="store_true",
                    help="also SSD fwd+bwd vs causal SDPA at 2K-16K tokens per sequence, same tokens per batch")
    ap.add_argument("--write-tuned", metavar="JSON",
                    help="merge the autotuner's choices of this run into this table (kernels/tuned_configs.json "
                         "is the one the kernels read first)")
    ap.add_argument("--chunk-sweep", action="store_true",
                    help="also time the SSD of the presets' mixers (one layer, training micro batch) at chunk 64-256")
    ap.add_argument("--order", action="store_true",
                    help="only time the chunk scan and dx launched heads-fast and chunks-fast, at the target "
                         "and the presets' shapes (nothing else)")
    ap.add_argument("--configs", nargs="*", choices=SWEPT, metavar="KERNEL",
                    help="only time the chunk scan, dx, the chunk states and dprev, dCB and dB/dC (or those named: "
                         f"{', '.join(SWEPT)}) at every config of their lists, at the target shapes and the "
                         "presets' (with 4 documents a row, as training packs them)")
    ap.add_argument("--first-call", metavar="PRESET", choices=[name for name, _ in CHUNK_SWEEP],
                    help="only the start-up cost of the first SSD, conv and norm calls at that preset's mixer "
                         "shape with 4 documents a row, as a training process meets them (run it in a fresh "
                         "process with an empty TRITON_CACHE_DIR for the cold cost)")
    ap.add_argument("--splits", action="store_true",
                    help="only time dCB + dB/dC at every head split, at the target and the presets' shapes "
                         "(nothing else)")
    args = ap.parse_args()
    if args.write_tuned:
        record_tuning()
    if args.first_call:
        b, L, h, p, g, n = dict(CHUNK_SWEEP)[args.first_call]
        print(first_call_seconds(ssd_shape=(b, L, h, p, g, n), mixer=(b, L, h * p, h * p + 2 * g * n), documents=4))
        return
    if args.splits:
        print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}")
        for shape in [t[:6] for t in TARGETS] + [s for _, s in CHUNK_SWEEP]:
            emit(f"dCB + dB/dC, shape {shape}: " + ", ".join(f"{k} {ms:.3f}" for k, ms in breakdown(*shape, splits_only=True)))
        return
    if args.configs is not None:
        print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}")
        shapes = [(t[:6], 0) for t in TARGETS] + [(s, 4) for _, s in CHUNK_SWEEP]
        times = {}
        for shape, docs in shapes:
            for name, ms in config_sweep(*shape, documents=docs, only=args.configs or SWEPT):
                emit(f"shape {shape} documents {docs}: {name} {ms:.3f}")
                times.setdefault(name, []).append(ms)
        print(config_table(times, [f"{s[0]}x{s[1]} {s[2]}x{s[3]} G{s[4]}" + (f", {d} docs" if d else "")
                                   for s, d in shapes]))
        if args.write_tuned:
            print(f"{write_tuned_table(args.write_tuned)} autotuning choices written to {args.write_tuned}")
        return
    if args.order:
        print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}")
        for shape in [t[:6] for t in TARGETS] + [s for _, s in CHUNK_SWEEP]:
            emit(f"launch order, shape {shape}: " + ", ".join(f"{k} {ms:.3f}" for k, ms in launch_order(*shape)))
        if args.write_tuned:
            print(f"{write_tuned_table(args.write_tuned)} autotuning choices written to {args.write_tuned}")
        return
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    peak_tf, peak_gb = ceilings()
    print(f"device: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, triton {triton.__version__}")
    print(f"measured ceilings: bf16 matmul 8192^3 {peak_tf:.0f} TFLOP/s, device copy {peak_gb:.0f} GB/s")
    print(first_call_seconds())
    hdr = (f"{'shape (b, L, HxP, G, N)':34s} {'impl':10s} {'fwd ms':>8s} {'tgt':>6s} {'TF/s':>6s} {'GB/s':>6s} "
           f"{'f+b ms':>8s} {'tgt':>6s} {'TF/s':>6s} {'GB/s':>6s} {'graph f':>8s} {'graph f+b':>9s}")
    emit(hdr)
    for (b, L, h, p, g, n, tgt_fb, tgt_f) in TARGETS:
        shape = f"{b}, {L}, {h}x{p}, {g}, {n}"
        fl = ssd_flops(b, L, h, p, g, n, 256)
        by_f, by_fb = ssd_bytes(b, L, h, p, g, n), ssd_bytes(b, L, h, p, g, n, bwd=True)
        rows = ssd_case(b, L, h, p, g, n, not args.no_ref)
        for name, (tf, tfb, gf, gfb) in rows.items():
            emit(
                f"{shape:34s} {name:10s} {tf:8.3f} {tgt_f if name == 'triton' else '':>6} {fl / tf / 1e9:6.1f} "
                f"{by_f / tf / 1e6:6.0f} {tfb:8.3f} {tgt_fb if name == 'triton' else '':>6} {3 * fl / tfb / 1e9:6.1f} "
                f"{by_fb / tfb / 1e6:6.0f} {gf:8.3f} {gfb:9.3f}")
        sf, sfb, sgf, sgfb = sdpa_case(b, L)
        afl = 4 * b * 32 * L * L * 128 / 2
        emit(f"{shape:34s} {'SDPA 32x128':10s} {sf:8.3f} {'':>6} {afl / sf / 1e9:6.1f} {'':>6} {sfb:8.3f} "
                     f"{'':>6} {3.5 * afl / sfb / 1e9:6.1f} {'':>6} {sgf:8.3f} {sgfb:9.3f}")
        torch.cuda.empty_cache()
    # conv1d and gated rmsnorm at the first shape's mixer sizes
    b, L, h, p, g, n = TARGETS[0][:6]
    dim = h * p + 2 * g * n
    xc = torch.randn(b, L, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    wc = torch.randn(dim, 4, device="cuda", requires_grad=True)
    bc = torch.randn(dim, device="cuda", requires_grad=True)
    gc = torch.randn_like(xc)
    by = 2 * xc.numel() * 2
    for name, fn in (("triton", kernels.causal_conv1d), ("torch ref", conv_ref)):
        def cf():
            return fn(xc, wc, bc, activation="silu")

        def cfb():
            fn(xc, wc, bc, activation="silu").backward(gc)

        tf, tfb, gf, gfb = timings(cf, cfb, [xc, wc, bc])
        emit(f"{f'conv1d ({b}, {L}, {dim}) w4 silu':34s} {name:10s} {tf:8.3f} {'':>6} {'':>6} "
                     f"{by / tf / 1e6:6.0f} {tfb:8.3f} {'':>6} {'':>6} {2.5 * by / tfb / 1e6:6.0f} {gf:8.3f} {gfb:9.3f}")
    yr = torch.randn(b, L, h * p, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    zr = torch.randn_like(yr, requires_grad=True)
    wr = torch.ones(h * p, device="cuda", requires_grad=True)
    gr = torch.randn_like(yr)
    by = 3 * yr.numel() * 2
    for name, fn in (("triton", kernels.rmsnorm_gated), ("torch ref", rms_ref)):
        def nf():
            return fn(yr, zr, wr, group_size=h * p // g)

        def nfb():
            fn(yr, zr, wr, group_size=h * p // g).backward(gr)

        tf, tfb, gf, gfb = timings(nf, nfb, [yr, zr, wr])
        emit(f"{f'rmsnorm_gated ({b}, {L}, {h * p})':34s} {name:10s} {tf:8.3f} {'':>6} {'':>6} "
                     f"{by / tf / 1e6:6.0f} {tfb:8.3f} {'':>6} {'':>6} {7 / 3 * by / tfb / 1e6:6.0f} {gf:8.3f} {gfb:9.3f}")
    if args.claim:
        emit("Mamba-2's claim, SSD (64x64, G1, N128) vs causal SDPA (32x128), 16384 tokens per batch; the SSD's "
             "result does not depend on its chunk size, so at 2K chunk 128 is timed beside 256 (the targets'):")
        for L in (2048, 4096, 8192, 16384):
            b = 16384 // L
            sdpa_f, sdpa_fb, _, sdpa_gfb = sdpa_case(b, L)
            for q in (256, 128) if L == 2048 else (256,):
                ssd_f, ssd_fb, _, ssd_gfb = ssd_case(b, L, 64, 64, 1, 128, with_ref=False, chunk=q)["triton"]
                emit(f"  seqlen {L:5d} x batch {b}, chunk {q}: SSD f+b {ssd_fb:.3f} ms, SDPA f+b {sdpa_fb:.3f} ms "
                     f"({sdpa_fb / ssd_fb:.2f}x); fwd {ssd_f:.3f} vs {sdpa_f:.3f} ms; from CUDA graphs f+b "
                     f"{ssd_gfb:.3f} vs {sdpa_gfb:.3f} ms ({sdpa_gfb / ssd_gfb:.2f}x)")
    if args.chunk_sweep:
        for name, shape in CHUNK_SWEEP:
            for q in (64, 128, 256):
                tf, tfb = ssd_case(*shape, with_ref=False, chunk=q)["triton"][:2]
                fl = ssd_flops(*shape, q)
                emit(f"{f'{name} {shape} chunk {q}':34s} {'triton':10s} {tf:8.3f} {'':>6} "
                             f"{fl / tf / 1e9:6.1f} {'':>6} {tfb:8.3f} {'':>6} {3 * fl / tfb / 1e9:6.1f}")
    if args.breakdown:
        for shape in TARGETS:
            parts = breakdown(*shape[:6])
            total = sum(ms for name, ms in parts if name in PIPELINE)
            emit(f"per-kernel, shape {shape[:6]}: " + ", ".join(f"{k} {ms:.3f}" for k, ms in parts)
                         + f"; sum of the tuned path's launches {total:.3f} ms")
        from kernels._triton_utils import _structures

        emit("structures chosen (timed): " + ", ".join(
            f"{name} {key[:4]}: {v} head splits" for (name, key), v in _structures.items()))
        for name, (b, L, h, p, g, n) in CHUNK_SWEEP:
            for kname, ms, nbytes in schedules(b, L, h * p, h * p + 2 * g * n):
                emit(f"{f'{name} {kname}':50s} {ms:8.3f} ms {nbytes / ms / 1e6:6.0f} GB/s")
    if args.write_tuned:
        print(f"{write_tuned_table(args.write_tuned)} autotuning choices written to {args.write_tuned}")


if __name__ == "__main__":
    main()
