"""Memory and time model on paper for a hybrid at scale: per-GPU memory and step time of a config
under each parallel layout the config accepts, and a short search for the fastest layout that fits.

    python bench/scale_model.py configs/jamba_v01.yaml --gpus 64 512 [--cp 8 16] [--top 6]
    python bench/scale_model.py configs/jamba_like.yaml --gpus 8 --widths 1024 2048 3072 4096

No GPU is used: parameters are counted on a model built on the meta device (exact), everything
else comes from the formulas below with the constants in ASSUMPTIONS. bench/NOTES_scale.md holds
the tables for Jamba-v0.1's geometry and says which constants are measured (one GPU) and which are
assumed (collective bandwidths: no multi-GPU machine has been lent to measure them).

Memory per GPU, for the first and the last pipeline stage (the larger is reported). It models the
parallel build: bf16 parameters, megatron DDP with fp32 gradient buffers, and the distributed
optimizer, which keeps fp32 main weights and Adam moments sharded over dp x cp for dense
parameters and over the expert-dp group (dp x cp / ep) for expert parameters.
- weights 2 B and gradients 4 B per parameter of the rank, optimizer 12 B per sharded parameter;
- activations: bytes kept per token by each block kind, from the tensors its backward keeps (the
  formulas in `kept_bytes_per_token`), scaled by the ratio measured on one GPU (bench/NOTES_train.md
  Run 11, hybrid_460m), divided by tp (sequence parallelism) and by cp; `trainer.recompute=full`
  keeps only each block's input. The first pipeline stage holds pp micro-batches in flight (1F1B).
- the last stage adds the vocab-parallel logits (bf16 plus a float32 softmax) of one micro-batch;
- a fixed allowance for the CUDA context, NCCL buffers and allocator slack.
Tensor and expert parallelism split the experts over tp x ep (parallel/README.md).

Time per step: the model FLOPs (pretrain/flops.py) of the slowest pipeline stage (the last one
also runs the LM head) at an assumed MFU for the compute, plus the
collectives that are not overlapped in this system: tp with sequence parallelism (all-gather and
reduce-scatter of each sublayer's input and output, forward and backward), ep all-to-all (dispatch
and combine, forward and backward), cp all-to-all (Ulysses: four per attention or Mamba sublayer,
forward and backward), the pipeline bubble (pp - 1 of m + pp - 1 micro-batch slots), the
distributed optimizer's parameter all-gather after the step (the gradient reduce-scatter overlaps
the backward), and the optimizer's memory traffic.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
from dataclasses import dataclass

sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from pretrain.config import ConfigError, load_config, validate  # noqa: E402
from pretrain.flops import head_forward_flops, layer_forward_flops, train_flops_per_token  # noqa: E402

GB = 1e9
ASSUMPTIONS = {
    "gpu_memory_gb": 80.0,        # H100 80GB (issue 11 lends H200s: 141 GB)
    "peak_tflops": 989.0,         # bf16 dense, H100 SXM / H200
    "mfu_compute": 0.40,          # the compute's MFU without communication: hybrid_1b3 measured 41.3% on one GPU
    "nvlink_busbw_gbs": 360.0,    # NCCL all-gather / reduce-scatter bus bandwidth within a node (assumed)
    "nvlink_alltoall_gbs": 300.0,  # all-to-all within a node (assumed)
    "ib_busbw_gbs": 45.0,         # per GPU across nodes, 400 Gb/s NDR per GPU (assumed)
    "hbm_gbs": 3000.0,            # optimizer step's memory traffic (H100 ~3.35 TB/s)
    "gpus_per_node": 8,
    "fixed_gb": 4.0,              # CUDA context, NCCL buffers, allocator slack (assumed)
}
# measured kept bytes per token / kept_bytes_per_token's formula at hybrid_460m (compile, recompute none,
# 8x4096, bench/NOTES_train.md Run 11: mamba 1057 MB, mlp 737 MB, attention 458 MB per block, each
# including the 128 MB float32 block output, for 32768 tokens; formulas with the single-process
# build's float32 residual stream); MoE blocks take the MLP's ratio (not measured)
CALIBRATION = {"mamba": 1057e6 / 32768 / 36928, "mlp": 737e6 / 32768 / 27136, "attention": 458e6 / 32768 / 16448}
CALIBRATION["moe"] = CALIBRATION["mlp"]


def kept_bytes_per_token(kind: str, cfg, derived, residual_bytes: int) -> float:
    """What a block's backward keeps per token (tp = cp = 1), before calibration; residual_bytes: 4 for
    the single-process build's float32 residual stream, 2 for the parallel build's bf16 one. The
    block's input (for the norm's backward) and output (the next block's input) count one residual
    each, the norm's output one bf16 d_model."""
    m = cfg.model
    d = m.d_model
    base = 2 * residual_bytes * d + 2 * d
    if kind == "mamba":
        mb, di = m.mamba, derived.mamba_d_inner
        gn = mb.num_groups * mb.d_state
        q = min(mb.chunk_size, cfg.data.seq_len)
        in_proj = 2 * (2 * di + 2 * gn + mb.num_heads)  # z, x, B, C, dt
        conv_out = 2 * (di + 2 * gn)
        states = 4 * di * mb.d_state / q  # float32 chunk states, one (heads, headdim, d_state) per chunk
        cb = 4 * mb.num_groups * q  # float32 C.B per chunk and group
        return base + in_proj + conv_out + states + cb + 2 * di + 2 * di  # + SSD output y, gated-norm output
    if kind == "attention":
        at, hd = m.attention, derived.attention_head_dim
        return base + 2 * (at.num_heads + 2 * at.num_kv_heads) * hd + 2 * at.num_heads * hd + 4 * at.num_heads
    if kind == "mlp":
        return base + (6 if m.mlp.activation == "swiglu" else 4) * m.mlp.d_ff
    if kind == "moe":
        moe = m.moe
        per_slot = 2 * d + (6 if moe.activation == "swiglu" else 4) * moe.d_ff + 2 * d  # dispatched x, act, y
        shared = (6 if moe.activation == "swiglu" else 4) * derived.moe_shared_d_ff if moe.num_shared_experts else 0
        return base + moe.top_k * per_slot + shared + 4 * moe.num_experts
    raise ValueError(f"unknown block kind {kind!r}")


def layer_parameters(cfg, derived) -> tuple[list[tuple[int, int]], int, int]:
    """Per residual sublayer (dense parameters, expert parameters), the embedding's, and the final
    norm's plus the head's (none when tied) parameter counts: exact, from the single-process model
    built on the meta device."""
    from pretrain.model import HybridLM

    with torch.device("meta"):
        model = HybridLM(cfg.model, derived, parallel=False)
    per_layer = []
    for block in model.layers:
        experts = getattr(block.mixer, "experts", None)
        n_exp = sum(p.numel() for p in experts.parameters()) if isinstance(experts, torch.nn.ModuleList) else 0
        per_layer.append((sum(p.numel() for p in block.parameters()) - n_exp, n_exp))
    embed = model.embeddings.weight.numel()
    head = model.lm_head.weight.numel() if model.lm_head is not None else 0
    return per_layer, embed, head + model.norm_f.weight.numel()


@dataclass
class Plan:
    tp: int
    pp: int
    ep: int
    cp: int
    dp: int
    recompute: str
    params_rank: float
    weights_gb: float
    optimizer_gb: float
    activations_gb: float
    total_gb: float
    step_s: float
    parts_s: dict
    tokens_per_s_gpu: float
    mfu: float


def plan(cfg, derived, per_layer, embed, head, a=ASSUMPTIONS) -> Plan:
    """Memory and step time of one layout (cfg.parallel, validated for derived.world_size)."""
    from parallel.pipeline import virtual_stage_layers

    p, m = cfg.parallel, cfg.model
    tp, pp, ep, cp, dp = p.tp, p.pp, p.ep, p.cp, derived.dp
    kinds = derived.layer_kinds
    stages = virtual_stage_layers(derived.stage_layer_counts, pp)
    micro = derived.grad_accum_steps  # micro-batches per step per pipeline
    tokens_mb = cfg.data.micro_batch_size * cfg.data.seq_len / cp  # tokens per micro-batch on a rank
    recompute_full = cfg.trainer.recompute == "full"
    if m.tie_embeddings and pp > 1:  # the last stage holds its own copy of the tied head (parallel/model.py)
        head = head + embed

    def stage_memory(i: int) -> tuple[float, float, float, float]:
        layers = stages[i]
        dense = (sum(per_layer[j][0] for j in layers) + (embed if i == 0 else 0) + (head if i == pp - 1 else 0)) / tp
        expert = sum(per_layer[j][1] for j in layers) / (tp * ep)
        weights = (2 + 4) * (dense + expert)
        optimizer = 12 * dense / (dp * cp) + 12 * expert / max(dp * cp // ep, 1)
        kept = [CALIBRATION[kinds[j]] * kept_bytes_per_token(kinds[j], cfg, derived, 2) for j in layers]
        per_token = len(layers) * 2 * m.d_model if recompute_full else sum(kept)
        in_flight = min(pp - i, micro)  # 1F1B: stage i holds pp - i micro-batches' activations
        act = per_token * tokens_mb / tp * in_flight
        if recompute_full:  # the block being recomputed holds its activations during its backward
            act += max(kept) * tokens_mb / tp
        if i == pp - 1:  # vocab-parallel logits of one micro-batch: bf16 + float32 softmax
            act += tokens_mb * m.vocab_size / tp * 6
        return dense + expert, weights, optimizer, act

    worst = max((stage_memory(i) for i in {0, pp - 1}), key=lambda s: s[1] + s[2] + s[3])
    params_rank, weights, optimizer, act = worst
    total = weights + optimizer + act + a["fixed_gb"] * GB

    # time of one step on the slowest pipeline stage: each stage runs its layers (the last also the
    # head) over all tokens of its dp replica, split over its tp x cp GPUs
    flops_tok = train_flops_per_token(cfg, derived)
    tokens_step = derived.tokens_per_step
    world = derived.world_size
    stage_flops = [3 * (sum(layer_forward_flops(kinds[j], cfg, derived) for j in layers)
                        + (head_forward_flops(cfg) if i == pp - 1 else 0.0)) for i, layers in enumerate(stages)]
    slowest = max(range(pp), key=lambda i: stage_flops[i])
    compute = stage_flops[slowest] * tokens_step / (dp * tp * cp) / (a["peak_tflops"] * 1e12 * a["mfu_compute"])
    if recompute_full:
        compute *= 4 / 3  # the forward again in the backward
    intra = tp * cp * ep <= a["gpus_per_node"]
    layers0 = stages[slowest]
    act_bytes = tokens_mb * m.d_model * 2  # one sublayer's input or output, bf16
    tp_s = cp_s = ep_s = 0.0
    passes = 3 if recompute_full else 2  # forward, backward (and the forward again)
    if tp > 1:  # SP: all-gather in, reduce-scatter out, in every pass
        per_sub = 2 * passes * act_bytes * (tp - 1) / tp / (a["nvlink_busbw_gbs"] * GB)
        tp_s = per_sub * len(layers0) * micro
    if cp > 1:
        bw = (a["nvlink_alltoall_gbs"] if intra else a["ib_busbw_gbs"]) * GB
        for j in layers0:
            if kinds[j] == "attention":
                width = 2 * (m.attention.num_heads + m.attention.num_kv_heads) * derived.attention_head_dim
            elif kinds[j] == "mamba":
                width = 2 * derived.mamba_d_inner + 2 * m.mamba.num_groups * m.mamba.d_state + m.mamba.num_heads
            else:
                continue
            cp_s += passes * tokens_mb * width * 2 / tp * (cp - 1) / cp / bw * micro
    if ep > 1:
        bw = (a["nvlink_alltoall_gbs"] if intra else a["ib_busbw_gbs"]) * GB
        n_moe = sum(kinds[j] == "moe" for j in layers0)
        ep_s = 2 * passes * tokens_mb / tp * m.moe.top_k * m.d_model * 2 * (ep - 1) / ep / bw * n_moe * micro
    bubble = (pp - 1) * (compute + tp_s + cp_s + ep_s) / micro  # pp - 1 idle micro-batch slots
    dp_group = dp * cp
    # the updated bf16 parameters all-gathered over dp x cp after the step (the reduce-scatter overlaps)
    dp_s = 2 * params_rank * (dp_group - 1) / dp_group / (a["ib_busbw_gbs"] * GB) if dp_group > 1 else 0.0
    # fused Adam over the fp32 shard (28 B per element) and the copy to the bf16 parameters (6 B)
    optim_s = 34 * params_rank / dp_group / (a["hbm_gbs"] * GB)
    step = compute + tp_s + cp_s + ep_s + bubble + dp_s + optim_s
    tok_s = tokens_step / step / world
    parts = {"compute": compute, "tp": tp_s, "cp": cp_s, "ep": ep_s, "bubble": bubble, "dp": dp_s, "optim": optim_s}
    return Plan(tp, pp, ep, cp, dp, cfg.trainer.recompute, params_rank, weights / GB, optimizer / GB, act / GB,
                total / GB, step, parts, tok_s, flops_tok * tok_s / (a["peak_tflops"] * 1e12))


def config_parameters(config: str, overrides: list[str]) -> tuple[list[tuple[int, int]], int, int]:
    """layer_parameters of a config file with overrides (no parallel layout needed)."""
    cfg = load_config([config], ["data.path=unused"] + overrides)
    return layer_parameters(cfg, validate(cfg))


def search(config: str, overrides: list[str], world: int, cps=(1,), recomputes=("none", "full"),
           a=ASSUMPTIONS, params=None) -> list[Plan]:
    """Every layout (tp, pp, ep powers of two; cp from `cps`; trainer.recompute from `recomputes`)
    that the config accepts at `world` GPUs. params: config_parameters(config, overrides) if known."""
    per_layer, embed, head = params or config_parameters(config, overrides)
    sizes = [1, 2, 4, 8, 16, 32, 64]
    out = []
    for tp, pp, ep, cp, rc in itertools.product(sizes[:4], sizes, sizes[:5], cps, recomputes):
        if tp * pp * cp > world or world % (tp * pp * cp):
            continue
        layout = [f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.ep={ep}", f"parallel.cp={cp}",
                  f"parallel.sequence_parallel={'true' if tp > 1 else 'false'}", f"trainer.recompute={rc}"]
        cfg = load_config([config], ["data.path=unused"] + overrides + layout)
        try:
            derived = validate(cfg, world)
        except ConfigError:
            continue
        out.append(plan(cfg, derived, per_layer, embed, head, a))
    return out


def width_overrides(d_model: int) -> list[str]:
    """A preset scaled to d_model the way jamba_like is built: head dim 64 (attention and Mamba),
    Mamba inner width 2 x d_model, MLP and expert d_ff 2.75 x d_model (a multiple of 128), 8 kv heads."""
    ff = round(2.75 * d_model / 128) * 128
    return [f"model.d_model={d_model}", f"model.mamba.num_heads={2 * d_model // 64}",
            f"model.attention.num_heads={d_model // 64}", "model.attention.num_kv_heads=8",
            f"model.mlp.d_ff={ff}", f"model.moe.d_ff={ff}"]


def largest_that_fits(config: str, overrides: list[str], world: int, widths: list[int], fits_gb: float,
                      cps=(1,), recomputes=("none", "full"), a=ASSUMPTIONS) -> list[tuple[int, float, Plan | None]]:
    """Per d_model in `widths`: (d_model, total parameters, the fastest layout that fits or None)."""
    out = []
    for width in widths:
        extra = overrides + width_overrides(width)
        params = config_parameters(config, extra)
        total = sum(d + e for d, e in params[0]) + params[1] + params[2]
        fits = [p for p in search(config, extra, world, cps, recomputes, a, params) if p.total_gb <= fits_gb]
        out.append((width, total, max(fits, key=lambda p: p.tokens_per_s_gpu) if fits else None))
    return out


def table(plans: list[Plan], fits_gb: float, top: int) -> list[str]:
    fits = sorted((p for p in plans if p.total_gb <= fits_gb), key=lambda p: -p.tokens_per_s_gpu)
    lines = [f"{len(plans)} layouts accepted by the config, {len(fits)} fit {fits_gb:.0f} GB; the fastest {top}:",
             "| tp | pp | ep | cp | dp | recompute | params/GPU | weights+grads GB | optimizer GB | activations GB "
             "| total GB | step s | compute | tp | cp | ep | bubble | dp | tok/s/GPU | MFU |",
             "|" + "---|" * 20]
    for p in fits[:top]:
        s = p.parts_s
        lines.append(f"| {p.tp} | {p.pp} | {p.ep} | {p.cp} | {p.dp} | {p.recompute} | {p.params_rank / 1e9:.2f}B "
                     f"| {p.weights_gb:.1f} "
                     f"| {p.optimizer_gb:.1f} | {p.activations_gb:.1f} | {p.total_gb:.1f} | {p.step_s:.2f} "
                     f"| {s['compute']:.2f} | {s['tp']:.2f} | {s['cp']:.2f} | {s['ep']:.2f} | {s['bubble']:.2f} "
                     f"| {s['dp']:.2f} | {p.tokens_per_s_gpu:.0f} | {100 * p.mfu:.1f}% |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides (e.g. data.seq_len=262144)")
    ap.add_argument("--gpus", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--gpu-memory", type=float, default=ASSUMPTIONS["gpu_memory_gb"])
    ap.add_argument("--top", type=int, default=6)
    ap.add_argument("--recompute", nargs="+", default=["none", "full"], choices=["none", "full"],
                    help="trainer.recompute values to search (the model prices these two)")
    ap.add_argument("--cp", type=int, nargs="+", default=[1],
                    help="context-parallel sizes to search (the model does not price the smaller per-rank "
                         "GEMMs of cp, so it is only searched where the sequence needs it)")
    ap.add_argument("--mfu", type=float, default=ASSUMPTIONS["mfu_compute"],
                    help="the compute's MFU (measured on one GPU: hybrid_1b3 0.41; jamba_like, host-bound at d_model "
                         "1024, 0.11)")
    ap.add_argument("--widths", type=int, nargs="+", metavar="D_MODEL",
                    help="instead: scale the config to each d_model (width_overrides) and report the fastest "
                         "layout that fits at each GPU count, i.e. the largest model that fits")
    args = ap.parse_args()
    ASSUMPTIONS["mfu_compute"] = args.mfu
    print("assumptions:", ", ".join(f"{k}={v}" for k, v in ASSUMPTIONS.items()))
    if args.widths:
        for world in args.gpus:
            print(f"\n{args.config} {' '.join(args.overrides)} scaled, at {world} GPUs "
                  f"({args.gpu_memory:.0f} GB each):")
            print("| d_model | parameters | fastest layout that fits (tp, pp, ep, cp, dp, recompute) | total GB "
                  "| tok/s/GPU |")
            print("|---|---|---|---|---|")
            for width, total, p in largest_that_fits(args.config, args.overrides, world, args.widths, args.gpu_memory,
                                                     tuple(args.cp), tuple(args.recompute)):
                layout = (f"{p.tp}, {p.pp}, {p.ep}, {p.cp}, {p.dp}, {p.recompute} | {p.total_gb:.1f} | "
                          f"{p.tokens_per_s_gpu:.0f}") if p else "none fits | | "
                print(f"| {width} | {total / 1e9:.2f}B | {layout} |")
        return
    for world in args.gpus:
        print(f"\n{args.config} {' '.join(args.overrides)} at {world} GPUs")
        plans = search(args.config, args.overrides, world, tuple(args.cp), tuple(args.recompute))
        print("\n".join(table(plans, args.gpu_memory, args.top)))


if __name__ == "__main__":
    main()
