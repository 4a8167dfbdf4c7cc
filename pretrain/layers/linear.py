"""Linear layers whose weight gradient is summed into a float32 buffer inside the weight-gradient GEMM
(gradient accumulation fusion, `trainer.gradient_accumulation_fusion`; Megatron-LM's name).

Under bf16 autocast over float32 weights, plain autograd does per micro-batch and weight: the
weight-gradient GEMM writes bf16, a kernel casts it to float32, and AccumulateGrad adds it into
`.grad` (read twice, write once): ~20 bytes of traffic per weight element, rounded to bf16 on the
way. Here the GEMM itself does `main_grad += grad_out^T @ input` with float32 output and beta = 1
(cuBLAS's epilogue: 8 bytes per element, no bf16 rounding), and autograd sees no weight gradient
at all. Autocast also casts every weight to bf16 in every micro-batch's forward; here each weight is
cast once per optimizer step and the copy serves the step's micro-batches (forward and input
gradients). bench/NOTES_train.md Run 22 has the measurements.

    Linear                a drop-in nn.Linear (same parameters, state_dict and init); while its
                          `main_grad` is a tensor and gradients are on, forward runs the fused path
    FusedLinears(model)   the buffers of one optimizer step for a model's Linear layers (those of
                          routed MoE experts excepted: their GEMMs are grouped, pretrain/layers/grouped_mlp.py):
                          `attach(dtype)` before each micro-batch's forward (zeros at the first, and
                          the weights cast to the autocast dtype once per step, not per micro-batch),
                          `release()` before clipping and the optimizer step (the sums become `.grad`)
    accumulate_wgrad_     the in-place GEMM, a torch.library custom op: torch.compile keeps it as one
                          in-place call in the backward graph (a mutation of a forward input)
    compute_dtype         the dtype nn.functional.linear would multiply in (autocast's where it is on)
    fusion_enabled        the config setting resolved (null: CUDA and two or more micro-batches per step)
    step_copy             a layer's weight copy of this step in a given dtype, if there is one

pretrain/recompute's linear_of_recomputed (mlp_act) and linear_of_rerun (mamba_norm) take the same
buffers for their linear.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# cuBLAS GEMM with bf16/fp16 inputs and a float32 output and addend (torch >= 2.8, CUDA only)
_HAS_ADDMM_OUT_DTYPE = hasattr(torch.ops.aten.addmm, "dtype_out")


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype nn.functional.linear(x, weight) would multiply in here (autocast's if enabled)."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(x.dtype, weight.dtype)


@torch.library.custom_op("pretrain::accumulate_wgrad_", mutates_args=("main_grad",))
def accumulate_wgrad_(main_grad: torch.Tensor, grad_out: torch.Tensor, inp: torch.Tensor) -> None:
    """main_grad (out, in) += grad_out (..., out)^T @ inp (..., in) over all leading positions, in
    place, products summed in main_grad's dtype (float32 or wider). bf16/fp16 inputs on CUDA: one
    cuBLAS GEMM with a float32 output and beta = 1; elsewhere the inputs are upcast first (the CPU's
    float32 path: one addmm_). Callers hand this op and the input-gradient GEMM the same view of
    grad_out: given two different views of one tensor in a compiled graph, Inductor writes the tensor
    once per view (bench/NOTES_train.md Run 22)."""
    if grad_out.shape[:-1] != inp.shape[:-1] or main_grad.shape != (grad_out.shape[-1], inp.shape[-1]):
        raise ValueError(f"accumulate_wgrad_: main_grad {tuple(main_grad.shape)} += grad_out "
                         f"{tuple(grad_out.shape)}^T @ inp {tuple(inp.shape)} does not fit")
    grad_out, inp = grad_out.reshape(-1, grad_out.shape[-1]), inp.reshape(-1, inp.shape[-1])
    low = grad_out.dtype in (torch.bfloat16, torch.float16)
    if main_grad.is_cuda and low and inp.dtype == grad_out.dtype and main_grad.dtype == torch.float32 \
            and _HAS_ADDMM_OUT_DTYPE:
        torch.ops.aten.addmm.dtype_out(main_grad, grad_out.t(), inp, torch.float32, out=main_grad)
    else:
        main_grad.addmm_(grad_out.t().to(main_grad.dtype), inp.to(main_grad.dtype))


@accumulate_wgrad_.register_fake
def _(main_grad, grad_out, inp):
    return None


class _FusedLinear(torch.autograd.Function):
    """(x (..., in), weight (out, in), bias (out,) | None, main_grad (out, in), dtype, weight_copy) ->
    (..., out) in dtype; backward: d x, d bias, and d weight summed into main_grad (None to autograd).
    weight_copy: weight already in dtype (the step's copy), or None to cast it here."""

    @staticmethod
    def forward(ctx, x, weight, bias, main_grad, dtype, weight_copy):
        # weight is an input even where the copy is multiplied: it ties the output to the weight in
        # autograd, so the backward (and the sum into main_grad) runs even if x needs no gradient
        with torch.autocast(x.device.type, enabled=False):
            xd = x.to(dtype)
            wd = weight_copy if weight_copy is not None else weight.to(dtype)
            out = F.linear(xd, wd, bias.to(dtype) if bias is not None else None)
        ctx.save_for_backward(xd, wd, main_grad)
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xd, wd, main_grad = ctx.saved_tensors
        # one (rows, out) view feeds both GEMMs: handed different views of one tensor, Inductor
        # writes it once per view (bench/NOTES_train.md Run 22)
        rows_out = grad_out.to(wd.dtype).reshape(-1, grad_out.shape[-1])
        accumulate_wgrad_(main_grad, rows_out, xd.reshape(-1, xd.shape[-1]))
        grad_x = (rows_out @ wd).to(ctx.x_dtype).view(*xd.shape) if ctx.needs_input_grad[0] else None
        grad_bias = rows_out.sum(0).to(ctx.bias_dtype) if ctx.bias_dtype is not None else None
        return grad_x, None, grad_bias, None, None, None


def step_copy(linear: nn.Linear, dtype: torch.dtype) -> torch.Tensor | None:
    """The linear's weight copy of this step (FusedLinears.attach) if it is in dtype, else None."""
    copy = getattr(linear, "weight_copy", None)
    return copy if copy is not None and copy.dtype == dtype else None


def fused_linear(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """linear(x) in compute_dtype(x, weight), whose weight gradient is added into `linear.main_grad`
    (the weight's shape and dtype) instead of going to autograd; the weight is `linear.weight_copy`
    where that is in the compute dtype."""
    weight, main_grad = linear.weight, linear.main_grad
    if main_grad.shape != weight.shape or main_grad.dtype != weight.dtype:
        raise ValueError(f"main_grad {tuple(main_grad.shape)} {main_grad.dtype} does not match the weight "
                         f"{tuple(weight.shape)} {weight.dtype}")
    dtype = compute_dtype(x, weight)
    return _FusedLinear.apply(x, weight, linear.bias, main_grad, dtype, step_copy(linear, dtype))


class Linear(nn.Linear):
    """nn.Linear that takes the fused path while `main_grad` is set (by FusedLinears) and gradients are on."""

    main_grad: torch.Tensor | None = None
    weight_copy: torch.Tensor | None = None  # the weight in the autocast dtype, made once per step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.main_grad is None or not torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        return fused_linear(x, self)


def fusion_enabled(setting: bool | None, device: torch.device, micro_batches_per_step: int) -> bool:
    """trainer.gradient_accumulation_fusion -> whether the engine fuses. null: on CUDA when a step sums
    two or more micro-batches. With one there is nothing to accumulate: plain autograd's bf16 GEMM,
    cast and AccumulateGrad (which takes the tensor, no add) move less memory than zeroed buffers and a
    GEMM that reads them, and the buffers would exist from the forward on, not from the backward."""
    if setting is None:
        return device.type == "cuda" and micro_batches_per_step > 1
    return setting


class FusedLinears:
    """A model's fused Linear layers and their buffers for one optimizer step: the float32 weight-gradient
    sums, and the weights cast once to the autocast dtype (not once per micro-batch)."""

    def __init__(self, model: nn.Module):
        experts = {id(m) for moe in model.modules() if hasattr(moe, "experts") for m in moe.experts.modules()}
        self.layers = [m for m in model.modules() if isinstance(m, Linear) and id(m) not in experts]
        for layer in self.layers:
            if layer.weight.dtype not in (torch.float32, torch.float64):
                raise ValueError(f"gradient accumulation fusion sums into the weights' dtype, which must be "
                                 f"float32 or float64, not {layer.weight.dtype} (bf16 parameters: the megatron engine)")

    @torch.no_grad()
    def attach(self, dtype: torch.dtype | None = None) -> None:
        """Before a micro-batch's forward: every layer gets its gradient buffer (zeros at the step's
        first) and, with a dtype (the engine's autocast dtype) other than the weight's, the weight's
        copy in it (made at the step's first micro-batch)."""
        for layer in self.layers:
            if layer.main_grad is None:
                layer.main_grad = torch.zeros_like(layer.weight, memory_format=torch.contiguous_format)
            if dtype is not None and dtype != layer.weight.dtype and layer.weight_copy is None:
                layer.weight_copy = layer.weight.to(dtype)

    def release(self) -> None:
        """Before clipping and the optimizer: each gradient buffer becomes its weight's `.grad` (plus any
        gradient autograd gave the weight by another path) and the weight copies are dropped (the
        optimizer changes the weights); the next attach starts afresh."""
        for layer in self.layers:
            buffer, layer.main_grad, layer.weight_copy = layer.main_grad, None, None
            if buffer is None:
                continue
            weight = layer.weight
            if weight.grad is not None:
                buffer += weight.grad
            weight.grad = buffer
