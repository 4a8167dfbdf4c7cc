"""Run under TRITON_INTERPRET=1 by test_kern_compile.py (the interpreter must be on before the
kernels are defined): the Triton ops as torch.library custom ops under torch.compile. Prints
`JSON:` and one dict per case.

- opcheck: torch.library.opcheck on each forward op (schema, fake implementation against the
  real outputs' shapes/dtypes/strides, autograd registration, AOT dispatch), over the optional
  inputs' combinations the model uses;
- block: a Mamba residual block compiled (Inductor, CPU) against the same block eager, per
  recomputation policy: dynamo's graph and break counts, and the largest relative difference of
  the output and of every gradient; and the eager block under the policy against the eager block
  without recomputation (`eager_vs_none.` keys).
"""
import json
import os

import torch
import torch._dynamo

import kernels
from kernels.conv1d import triton_op as conv_op
from kernels.mamba_inner import triton_op as inner_op
from kernels.rmsnorm_gated import triton_op as rms_op
from kernels.ssd import triton_op as ssd_op
from pretrain.config import load_config, validate
from pretrain.model import ResidualBlock
from pretrain.recompute import apply_policy, parse_policy

_g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


def rand(*shape, scale=1.0, grad=True):
    return (torch.randn(*shape, generator=_g) * scale).requires_grad_(grad)


def opchecks() -> dict:
    res = {}
    b, l, dim, w = 2, 37, 24, 4
    seq = torch.zeros(b, l, dtype=torch.int32)
    seq[0, 11:] = 1
    for name, bias, s in (("conv_bias_seq", True, seq), ("conv_nobias", False, None)):
        args = (rand(b, l, dim), rand(dim, w, scale=0.5), rand(dim, scale=0.1) if bias else None, s, True)
        torch.library.opcheck(conv_op._conv_fwd_op, args)
        res[name] = 1.0
    for name, with_z in (("rms_z", True), ("rms_noz", False)):
        args = (rand(3, 5, 32), rand(3, 5, 32) if with_z else None, rand(32), 8, 1e-5, False)
        torch.library.opcheck(rms_op._fwd_op, args)
        res[name] = 1.0
    h, p, g, n, q = 4, 5, 2, 6, 16
    l = 45
    seq = torch.zeros(b, l, dtype=torch.int32)
    seq[0, 20:] = 1

    def ssd_args(full, keep):
        return (rand(b, l, h, p), rand(b, l, h, scale=0.5), -torch.rand(h, generator=_g).add(0.2).requires_grad_(),
                rand(b, l, g, n), rand(b, l, g, n), rand(h) if full else None, rand(b, l, h, p) if full else None,
                rand(h, scale=0.1) if full else None, seq if full else None, rand(b, h, p, n) if full else None,
                q, True, 0.0, float("inf"), keep, None, None, None, False)

    for name, full, keep in (("ssd_full_keep", True, True), ("ssd_full_recompute", True, False),
                             ("ssd_bare", False, True)):
        torch.library.opcheck(ssd_op._fwd_op, ssd_args(full, keep))
        res[name] = 1.0
    gn, d_inner = g * n, h * p
    conv_dim = d_inner + 2 * gn

    def inner_args(bias, seq_idx, keep_conv, keep_states):
        return (rand(b, l, d_inner + conv_dim + h), rand(conv_dim, w, scale=0.5),
                rand(conv_dim, scale=0.1) if bias else None, rand(h, scale=0.1), -torch.rand(h, generator=_g).add(0.2),
                rand(h), rand(d_inner), seq_idx, [h, p, g, n], q, 0.0, float("inf"), 1e-5, False, keep_conv,
                keep_states)

    for name, bias, s, keep in (("inner_keep", True, seq, True), ("inner_recompute", False, None, False)):
        torch.library.opcheck(inner_op._fwd_op, inner_args(bias, s, keep, keep))
        res[name] = 1.0
    return res


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def compiled_block(policy: str, hidden, seq_idx, seed) -> dict:
    cfg = load_config(["configs/hybrid_460m.yaml"], [
        "model.d_model=64", "model.mamba.num_heads=4", "model.mamba.head_dim=16", "model.mamba.num_groups=2",
        "model.mamba.d_state=16", "model.mamba.chunk_size=16"])
    derived = validate(cfg)

    def block():
        torch.manual_seed(0)
        blk = ResidualBlock("mamba", cfg.model, derived)
        apply_policy(blk, parse_policy(policy))
        return blk

    def block_without_recompute():
        torch.manual_seed(0)
        return ResidualBlock("mamba", cfg.model, derived)

    runs = []
    for compiled in (False, True, None):
        blk = block() if compiled is not None else block_without_recompute()
        h = hidden.clone().requires_grad_(True)
        fn = torch.compile(blk) if compiled else blk
        out = fn(h, seq_idx)
        grads = torch.autograd.grad((out * seed).sum(), [h, *blk.parameters()])
        runs.append((out.detach(), grads))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(block())(hidden.clone().requires_grad_(True), seq_idx)
    (out0, g0), (out1, g1), (out_none, g_none) = runs
    names = ["hidden"] + [n for n, _ in block().named_parameters()]
    res = {"graphs": explained.graph_count, "breaks": explained.graph_break_count, "out": _rel(out1, out0),
           "eager_vs_none.out": _rel(out0, out_none)}
    res.update({f"d{n}": _rel(a, b) for n, a, b in zip(names, g1, g0)})
    res.update({f"eager_vs_none.d{n}": _rel(a, b) for n, a, b in zip(names, g0, g_none)})
    return res


def main():
    kernels.set_backend("triton")
    out = {"opcheck": opchecks()}
    hidden = rand(2, 45, 64, grad=False)
    seq_idx = torch.zeros(2, 45, dtype=torch.int32)
    seq_idx[1, 19:] = 1
    seed = rand(2, 45, 64, grad=False)
    for policy in ("none", "mamba_conv,mamba_states", "mamba_norm,mamba_conv,mamba_states"):
        out[f"block[{policy}]"] = compiled_block(policy, hidden, seq_idx, seed)
    print("JSON:" + json.dumps(out))


if __name__ == "__main__":
    main()
