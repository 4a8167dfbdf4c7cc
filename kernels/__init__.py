"""Triton kernels for the Mamba-2 mixer and the LM loss, each beside a pure-PyTorch reference.

Public ops (dispatch on kernels.backend):
  ssd_scan                 kernels/ssd      chunked SSD (Mamba-2 scan), forward and backward
  causal_conv1d            kernels/conv1d   causal depthwise conv1d (+ SiLU, seq_idx)
  causal_conv1d_update     kernels/conv1d   one decoding step of the above
  rmsnorm_gated            kernels/rmsnorm_gated  grouped RMSNorm with SiLU gate
  mamba_inner              kernels/mamba_inner    the Mamba mixer between in_proj and out_proj (split,
                                                  conv, SSD, gated norm): on Triton one autograd node
                                                  whose backward writes in_proj's output gradient once
  cross_entropy_rows       kernels/cross_entropy  row-wise softmax cross-entropy, logit gradient in place
                                                  (the LM head's loss, pretrain/chunked_loss.py)

Under torch.compile: the Triton paths of ssd_scan, causal_conv1d, rmsnorm_gated and mamba_inner are torch.library
custom ops (namespace hybrid_pretrain, a forward op and a backward op each, with fake implementations
giving the outputs' shapes, dtypes and strides), so dynamo traces a compiled block around them in one
graph and Inductor neither looks inside nor retunes them: the launches go through kernels'
own launcher (its shipped table, kernels.deterministic). Argument checks stay in Python, before the op.
In eager mode the forward ops run inside a plain autograd.Function with the same backward
(kernels/_autograd_op.py: register_autograd's eager path costs ~70 us of host time a call).
"""

from kernels.backend import get_backend, get_deterministic, set_backend, set_deterministic, use_triton
from kernels.conv1d.op import causal_conv1d, causal_conv1d_update
from kernels.cross_entropy.op import cross_entropy_rows
from kernels.mamba_inner.op import mamba_inner
from kernels.rmsnorm_gated.op import rmsnorm_gated
from kernels.ssd.op import ssd_scan

__all__ = [
    "causal_conv1d",
    "causal_conv1d_update",
    "cross_entropy_rows",
    "get_backend",
    "get_deterministic",
    "mamba_inner",
    "rmsnorm_gated",
    "set_backend",
    "set_deterministic",
    "ssd_scan",
    "use_triton",
]
