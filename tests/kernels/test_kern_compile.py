"""The Triton ops under torch.compile (compile_cases.py, run in a subprocess under TRITON_INTERPRET=1).

- torch.library.opcheck passes for the conv, gated-norm and SSD forward ops (their fake outputs
  match the real ones' metadata, the autograd registration holds) over the optional-input cases;
- a compiled Mamba residual block is one dynamo graph with no break (the ops are opaque custom ops,
  so Inductor does not trace into the Triton launches), for the default policy and with the
  recomputation parts (mamba_norm through the norm's explicit vjp: no autograd.grad inside a
  backward), and its output and every gradient match the same block eager, and the eager block
  under the policy matches the eager block without recomputation, within 1e-5 relative (float32:
  Inductor fuses the pre-norm and the residual differently, observed ~1e-7; the gradients of
  dt_bias and A_log, sums over all tokens with cancellation, up to ~1e-5 (A_log's once 1.03e-5 in
  CI): 1e-4, as the interpreter tests allow such reductions more).
"""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def results():
    root = os.path.dirname(os.path.dirname(HERE))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.join(HERE, "compile_cases.py")], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.split("JSON:", 1)[1])


def test_custom_ops_pass_opcheck(results):
    assert set(results["opcheck"]) == {"conv_bias_seq", "conv_nobias", "rms_z", "rms_noz", "ssd_full_keep",
                                       "ssd_full_recompute", "ssd_bare"}


@pytest.mark.parametrize("policy", ["none", "mamba_conv,mamba_states", "mamba_norm,mamba_conv,mamba_states"])
def test_compiled_mamba_block_is_one_graph_and_matches_eager(results, policy):
    res = dict(results[f"block[{policy}]"])
    assert (res.pop("graphs"), res.pop("breaks")) == (1, 0)
    tol = {f"{pre}dmixer.{p}": 1e-4 for pre in ("", "eager_vs_none.") for p in ("dt_bias", "A_log")}
    bad = {k: v for k, v in res.items() if not v <= tol.get(k, 1e-5)}
    assert not bad, f"compiled vs eager relative differences above tolerance: {bad} (all: {res})"


def test_recomputed_gated_norm_is_not_merged_with_the_forward_by_cse():
    """AOTAutograd's common-subexpression pass over the joint graph (as torch 2.11 runs it: forward and
    backward nodes alike) must keep the backward's rerun of the gated norm (recomputation=True) apart
    from the forward's call with the same tensors, while it still merges a plain duplicate (so the
    pass did run). Traced with fake tensors: no kernel runs."""
    import torch
    from torch._functorch.compile_utils import fx_graph_cse
    from torch.fx.experimental.proxy_tensor import make_fx

    from kernels.rmsnorm_gated.triton_op import _fwd_op

    def f(y, z, w):
        forward = _fwd_op(y, z, w, 8, 1e-5, False)[0]
        rerun = _fwd_op(y, z, w, 8, 1e-5, False, recomputation=True)[0]
        duplicate = _fwd_op(y, z, w, 8, 1e-5, False)[0]
        return forward + rerun + duplicate

    graph = make_fx(f, tracing_mode="fake")(torch.randn(6, 32), torch.randn(6, 32), torch.randn(32)).graph
    calls = [n for n in fx_graph_cse(graph).nodes if n.op == "call_function" and "rmsnorm_gated_fwd" in str(n.target)]
    assert len(calls) == 2
