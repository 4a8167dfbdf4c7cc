"""The Mamba mixer core as one node (kernels.mamba_inner) against the same kernels as separate ops, at
a preset's mixer shape; one table.

    python bench/mamba_core.py configs/hybrid_1b3.yaml[:key=value,...] [--recompute]

One Mamba layer's core (conv1d + SiLU, SSD scan, gated norm; between in_proj and out_proj) over the
preset's micro-batch (micro_batch_size x seq_len, four documents per row), bf16 activations and
float32 parameters as under autocast. The median time (bench/kernels.py's timing: triton's
do_bench, CUDA events, L2 flushed between calls) of the forward and of the forward + backward of:
- `separate ops`: the conv, SSD and norm ops on views of the packed projection, autograd joining
  the gradients of the views with cats (what the mixer ran before the fused node);
- `fused node`: kernels.mamba_inner, every gradient written into slices of one buffer;
each with the preset's recompute parts, or with `--recompute` mamba_conv and mamba_states on.
The whole model has one such core per Mamba layer (the last column: per micro-batch).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels  # noqa: E402
from bench.kernels import bench  # noqa: E402  (the kernel benchmark's timing: do_bench's median)
from bench.presets import load_spec  # noqa: E402
from kernels.mamba_inner.op import MambaDims, mamba_inner  # noqa: E402
from kernels.mamba_inner.reference import split_packed, split_xbc  # noqa: E402


def separate_ops(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, *, dims, chunk_size, dt_limit,
                 norm_eps, norm_before_gate, seq_idx=None, recompute_conv=False, recompute_states=False):
    """The mixer core through the separate dispatching ops (conv1d, SSD, gated norm on views of the
    packed projection); same signature and result as kernels.mamba_inner.op.mamba_inner without
    return_y. What the fused node replaces, and its tests' comparison."""
    z, xBC, dt = split_packed(zxbcdt, dims)
    conv_source = (xBC, conv_weight, conv_bias, "silu") if recompute_conv else None
    xbc = kernels.causal_conv1d(xBC, conv_weight, conv_bias, seq_idx=seq_idx, activation="silu")
    x, B, C = split_xbc(xbc, dims)
    y = kernels.ssd_scan(x, dt, A, B, C, chunk_size=chunk_size, D=D, dt_bias=dt_bias, dt_softplus=True,
                         dt_limit=dt_limit, seq_idx=seq_idx, conv_source=conv_source, recompute_states=recompute_states)
    return kernels.rmsnorm_gated(y.reshape(z.shape), z, norm_weight, group_size=dims.d_inner // dims.ngroups,
                                 eps=norm_eps, norm_before_gate=norm_before_gate)


def core_case(spec: str, device: str, dtype: torch.dtype, recompute: bool):
    """(leaves, keyword arguments, Mamba layers in the preset) for one core at the preset's shape."""
    cfg, derived = load_spec(spec)
    m = cfg.model.mamba
    dims = MambaDims(m.num_heads, m.head_dim, m.num_groups, m.d_state)
    batch, seqlen = cfg.data.micro_batch_size, cfg.data.seq_len
    g = torch.Generator().manual_seed(0)
    leaves = [torch.randn(batch, seqlen, dims.packed_dim, generator=g).to(device, dtype),
              torch.randn(dims.conv_dim, m.d_conv, generator=g) * 0.5, torch.randn(dims.conv_dim, generator=g) * 0.1,
              torch.randn(m.num_heads, generator=g) * 0.1 - 2, -torch.rand(m.num_heads, generator=g) - 0.2,
              torch.randn(m.num_heads, generator=g), 1 + 0.1 * torch.randn(dims.d_inner, generator=g)]
    leaves = [leaves[0].requires_grad_(True)] + [t.to(device).requires_grad_(True) for t in leaves[1:]]
    seq_idx = (torch.arange(seqlen) * 4 // seqlen).int().expand(batch, -1).contiguous().to(device)
    kw = dict(dims=dims, chunk_size=m.chunk_size, dt_limit=(m.dt_limit_min, m.dt_limit_max), norm_eps=cfg.model.norm_eps,
              norm_before_gate=m.norm_before_gate, seq_idx=seq_idx, recompute_conv=recompute,
              recompute_states=recompute)
    return leaves, kw, derived.layer_kinds.count("mamba")


def forward_backward(fn, leaves, kw, seed):
    torch.autograd.backward(fn(*leaves, **kw), seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--recompute", action="store_true", help="with the mamba_conv and mamba_states hints")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/mamba_core.py needs a CUDA GPU")
    leaves, kw, layers = core_case(args.config, "cuda", torch.bfloat16, args.recompute)
    seed = torch.randn(*leaves[0].shape[:2], kw["dims"].d_inner, device="cuda", dtype=torch.bfloat16)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {tuple(leaves[0].shape)} packed projection, "
          f"{kw['dims']}, recompute hints {'on' if args.recompute else 'off'}; median ms (triton's do_bench)\n")
    print("| core | forward | forward + backward | forward + backward x Mamba layers |\n|---|---|---|---|")
    for name, fn in (("separate ops", separate_ops), ("fused node", mamba_inner)):
        with torch.no_grad():
            fwd = bench(lambda: fn(*leaves, **kw))
        both = bench(lambda: forward_backward(fn, leaves, kw, seed), grad_to_none=leaves)
        print(f"| {name} | {fwd:.3f} | {both:.3f} | {both * layers:.1f} ({layers}) |")


if __name__ == "__main__":
    main()
