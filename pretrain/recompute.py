"""Activation recomputation (`trainer.recompute`): which residual blocks save only their input for the
backward pass and run their forward again there, trading compute for activation memory.

Policies: "none"; "full" (every block); or a comma-separated list of block kinds (mamba, attention,
mlp, moe): selective recomputation, e.g. "mamba,moe". Both model builds (pretrain/model.py and
parallel/model.py) run their blocks through `run_block`, with torch.utils.checkpoint (non-reentrant:
tensors saved anywhere inside the block, the MoE aux loss included, are recomputed on use).

The list may also name parts, which recompute one cheap result instead of a whole block
(`apply_policy` sets them on the layers; mamba_conv and mamba_states in both builds, the others
single-process):
- mlp_act: act(gate, up) of every dense MLP, recomputed for the down projection's backward
  (pretrain/layers/mlp.py): one (tokens, d_ff) tensor less per MLP. MoE experts only where they run
  as a loop of MLP modules (CPU, float32); on CUDA's grouped-GEMM path (pretrain/layers/grouped_mlp.py)
  the experts keep their product;
- mamba_norm: the Mamba mixer's gated RMSNorm output, recomputed for out_proj's backward
  (pretrain/layers/mamba.py, `linear_of_rerun`): one (tokens, d_inner) tensor less per mixer;
- mamba_conv: the mixer's conv1d output (x, B, C), rerun from the conv's input in the SSD scan's
  backward (Triton path; parallel/mamba.py too): one (tokens, d_inner + 2 ngroups dstate) tensor
  less per mixer;
- mamba_states: the SSD scan's float32 chunk states and CB matrices, rerun by their forward kernels
  in its backward (Triton path; both builds): (batch, seqlen/Q, nheads, headdim, dstate) float32
  and (batch, seqlen/Q, ngroups, Q, Q) float32 less per mixer.

Side effects of a block's forward must happen once: `is_recomputing()` is true while a block's
forward is rerun in the backward pass, and the MoE routing counters (pretrain/layers/moe.py) are
only updated outside it.
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils.checkpoint import checkpoint

from pretrain.layers.linear import accumulate_wgrad_, compute_dtype, step_copy

KINDS = ("mamba", "attention", "mlp", "moe")
PARTS = ("mlp_act", "mamba_norm", "mamba_conv", "mamba_states")
# part -> the flag attribute that the layers implementing it declare (pretrain/layers, parallel/mamba.py)
_PART_FLAGS = {"mlp_act": "recompute_act", "mamba_norm": "recompute_norm", "mamba_conv": "recompute_conv",
               "mamba_states": "recompute_states"}

_recomputing = 0


def parse_policy(policy: str) -> frozenset[str]:
    """"none" | "full" | "kind[,kind...]" -> the block kinds and parts to recompute; ValueError naming
    what is wrong."""
    text = policy.strip().lower()
    if text in ("", "none"):
        return frozenset()
    if text == "full":
        return frozenset(KINDS)
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS + PARTS]
    if unknown or not kinds:
        raise ValueError(f"unknown block kind(s) {unknown or [policy]}: use none, full or a comma-separated "
                         f"subset of {', '.join(KINDS + PARTS)}")
    return frozenset(kinds)


def apply_policy(model: torch.nn.Module | list[torch.nn.Module], kinds: frozenset[str]) -> None:
    """Set a parsed policy on a model, or on all chunks of one (pipeline stages: a part must have a
    layer in some chunk, not in each): the block kinds for `run_block`, the parts on the layers."""
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    taken = set()
    for chunk in chunks:
        chunk.recompute_kinds = kinds
        taken |= set_parts(chunk, kinds)
    unused = sorted(kinds.intersection(PARTS) - taken)
    if unused:
        raise ValueError(f"trainer.recompute names {', '.join(unused)}, but this model build has no layer it "
                         "applies to (mlp_act and mamba_norm: the single-process build's MLP and Mamba layers; "
                         "mamba_conv, mamba_states: both builds' Mamba layers)")


def set_parts(module: torch.nn.Module, kinds: frozenset[str]) -> set[str]:
    """Set the parts named in `kinds` on (and the others off) every layer in `module` that implements
    one; returns the parts that some layer there implements. Block kinds are apply_policy's."""
    implemented = set()
    for layer in module.modules():
        for part, flag in _PART_FLAGS.items():
            if hasattr(type(layer), flag):  # the layer classes that implement a part declare its flag
                setattr(layer, flag, part in kinds)
                implemented.add(part)
    return implemented


def linear_of_recomputed(fn_with_vjp, inputs: tuple, linear: torch.nn.Linear) -> torch.Tensor:
    """linear(fn(*inputs)), keeping `inputs` but not fn's output for the backward: there fn reruns
    (under the forward's autocast state: the same bits) and its explicit backward takes the gradient
    to the inputs. `fn_with_vjp(*inputs, rerun=False) -> (fn(*inputs), vjp)`, where vjp(d_output)
    returns the inputs' gradients (None for None inputs): no torch.autograd.grad inside a backward,
    which torch.compile cannot trace. The backward calls it with rerun=True, where it must give the
    same bits through other nodes than the forward's (a compiler's CSE must not merge the two). The part mlp_act (fn = the MLP activation) uses it; fn's inputs
    are what fn's own backward would keep anyway. None inputs pass. A pretrain.layers.linear.Linear
    with its step's buffers attached (gradient accumulation fusion) gets its weight gradient added
    into `main_grad` instead of autograd, and multiplies with its step's weight copy."""
    weight = linear.weight
    copy = step_copy(linear, compute_dtype(weight, weight))  # autocast's dtype, else the weight's own
    return _LinearOfRecomputed.apply(fn_with_vjp, weight, linear.bias, getattr(linear, "main_grad", None), copy,
                                     *inputs)


def linear_of_rerun(x: torch.Tensor, rerun, rerun_inputs: tuple, linear: torch.nn.Linear) -> torch.Tensor:
    """linear(x) where x equals rerun(*rerun_inputs), keeping rerun_inputs but not x for the backward:
    there rerun runs again, without autograd, to give the weight gradient its input, and x's gradient
    goes back along x's own graph. For a layer whose own backward keeps rerun_inputs anyway and
    computes the rest of the gradient itself: mamba_norm (x = the fused Mamba core's output, rerun =
    its gated norm on the SSD output and z it keeps, pretrain/layers/mamba.py). Buffers and weight
    copy as in linear_of_recomputed."""
    weight = linear.weight
    copy = step_copy(linear, compute_dtype(weight, weight))
    return _LinearOfRerun.apply(x, rerun, weight, linear.bias, getattr(linear, "main_grad", None), copy,
                                *rerun_inputs)


def _save_linear(ctx, weight, bias, main_grad, weight_copy, *inputs) -> torch.Tensor:
    """Keep what _linear_grads needs (and `inputs`); -> the weight to multiply with."""
    ctx.fused = main_grad is not None
    w = weight_copy if weight_copy is not None else weight
    ctx.save_for_backward(w, main_grad, *inputs)
    ctx.weight_dtype = weight.dtype
    ctx.bias_dtype = bias.dtype if bias is not None else None
    device = weight.device.type
    ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
    return w


def _linear_grads(ctx, dout, h, weight, main_grad):
    """The linear's gradients as autocast's linear computes them (weight cast to the gradient's
    dtype), for its input h: -> (d weight or None where summed into main_grad, d bias, d h). One
    (rows, out) view of dout feeds every GEMM (see pretrain/layers/linear.py's _FusedLinear)."""
    dout2 = dout.reshape(-1, dout.shape[-1])
    h2 = h.detach().reshape(-1, h.shape[-1]).to(dout.dtype)
    if ctx.fused:
        accumulate_wgrad_(main_grad, dout2, h2)
        dweight = None
    else:
        dweight = (dout2.t() @ h2).to(ctx.weight_dtype)
    dbias = dout2.sum(0).to(ctx.bias_dtype) if ctx.bias_dtype is not None else None
    dh = (dout2 @ weight.to(dout.dtype)).to(h.dtype).view(h.shape)
    return dweight, dbias, dh


class _LinearOfRecomputed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn_with_vjp, weight, bias, main_grad, weight_copy, *inputs):
        ctx.fn_with_vjp = fn_with_vjp
        w = _save_linear(ctx, weight, bias, main_grad, weight_copy, *inputs)
        return torch.nn.functional.linear(fn_with_vjp(*inputs)[0], w, bias)

    @staticmethod
    def backward(ctx, dout):
        weight, main_grad, *inputs = ctx.saved_tensors  # weight: the step's copy where there is one
        device, amp, amp_dtype = ctx.autocast
        with torch.autocast(device, dtype=amp_dtype, enabled=amp):
            h, vjp = ctx.fn_with_vjp(*inputs, rerun=True)
        dweight, dbias, dh = _linear_grads(ctx, dout, h, weight, main_grad)
        dinputs = [g if need else None for g, need in zip(vjp(dh), ctx.needs_input_grad[5:])]
        return None, dweight, dbias, None, None, *dinputs


class _LinearOfRerun(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, rerun, weight, bias, main_grad, weight_copy, *rerun_inputs):
        ctx.rerun = rerun
        w = _save_linear(ctx, weight, bias, main_grad, weight_copy, *rerun_inputs)
        return torch.nn.functional.linear(x, w, bias)

    @staticmethod
    def backward(ctx, dout):
        weight, main_grad, *inputs = ctx.saved_tensors
        device, amp, amp_dtype = ctx.autocast
        with torch.no_grad(), torch.autocast(device, dtype=amp_dtype, enabled=amp):
            h = ctx.rerun(*inputs)
        dweight, dbias, dh = _linear_grads(ctx, dout, h, weight, main_grad)
        return dh, None, dweight, dbias, None, None, *(None,) * len(inputs)


def is_recomputing() -> bool:
    """True while a checkpointed block's forward is being rerun for the backward pass."""
    return _recomputing > 0


@contextlib.contextmanager
def _recomputation():
    global _recomputing
    _recomputing += 1
    try:
        yield
    finally:
        _recomputing -= 1


def _contexts():
    return contextlib.nullcontext(), _recomputation()


def run_block(block: torch.nn.Module, hidden: torch.Tensor, seq_idx: torch.Tensor | None,
              kinds: frozenset[str]) -> torch.Tensor:
    """block(hidden, seq_idx), checkpointed when its `kind` is in `kinds` and gradients are on."""
    if block.kind in kinds and torch.is_grad_enabled():
        return checkpoint(block, hidden, seq_idx, use_reentrant=False, context_fn=_contexts)
    return block(hidden, seq_idx)
