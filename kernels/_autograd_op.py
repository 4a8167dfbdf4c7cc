"""Autograd for the kernels' forward custom ops, cheap to call in eager mode; and the layout tag
for ops whose launchers take any strides.

`with_autograd(fwd_op, backward, setup_context)` registers `backward` on the custom op
(`register_autograd`: what torch.compile traces, the op one node of the graph with its backward)
and returns the callable the op folders use in its place:
- while dynamo traces (torch.compile), or with gradients off: the op itself;
- in eager mode with gradients on: a torch.autograd.Function running the same setup_context and
  backward around the op called below autograd. The results are the same; the reason is host time.
  register_autograd's eager path refills the op's default arguments on every call
  (torch._library.utils.fill_defaults), which reads the pybind schema's whole argument list once per
  argument: ~70 us a call for the SSD's 19 arguments on a 2-core CPU, more than the rest of its
  forward's Python (bench/NOTES_kernels.md, host overhead of 2026-12-05).
"""
from __future__ import annotations

from typing import Callable

import torch

# torch.compile's rule for a custom op's input layouts. Inductor's default for custom ops is the
# eager strides exactly: an input whose layout Inductor chose otherwise (a row stride padded to 128
# bytes, say) is copied before the call. An op whose launchers take any strides (views included)
# declares this tag: only the order of the strides must be eager's, so no copy is made for that.
# A tuple: torch 2.11's custom_op (the GPU image) takes a sequence of tags only; a bare Tag fails there.
ANY_STRIDES_IN_ORDER = (torch.Tag.needs_fixed_stride_order,)


def with_autograd(fwd_op, backward: Callable, setup_context: Callable) -> Callable:
    """fwd_op: a torch.library custom op; backward(ctx, *output_grads) -> one gradient per input;
    setup_context(ctx, inputs, output), as for register_autograd."""
    fwd_op.register_autograd(backward, setup_context=setup_context)

    def forward(ctx, *inputs):
        output = fwd_op(*inputs)  # gradients are off inside: the op's plain dispatch
        setup_context(ctx, inputs, output)
        return output

    # named after the op (its grad_fn shows as `<op>_autogradBackward` in traces and profiles)
    eager = type(f"{fwd_op._name}_autograd", (torch.autograd.Function,),
                 {"forward": staticmethod(forward), "backward": staticmethod(backward)})

    def call(*inputs):
        if torch.compiler.is_compiling() or not torch.is_grad_enabled():
            return fwd_op(*inputs)
        return eager.apply(*inputs)

    return call
