"""trainer.recompute: blocks of the chosen kinds rerun their forward in the backward pass. The loss,
every gradient and the MoE routing counts equal those of the run without recomputation (the same
float32 ops on the CPU, so the same values up to summation order), less is saved for backward, and a
bad policy is a config error naming it."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "parallel"))
from tiny_models import tiny_model  # noqa: E402
from context_workers import saved_activation_bytes  # noqa: E402

from pretrain.config import ConfigError, load_config, validate  # noqa: E402
from pretrain.recompute import apply_policy, parse_policy  # noqa: E402


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 64, (2, 33), generator=g)
    seq_idx = torch.zeros(2, 32, dtype=torch.int32)
    seq_idx[:, 20:] = 1  # two documents per row
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "seq_idx": seq_idx}


def _step(policy: str, router: str, mlp: str = "swiglu") -> tuple[float, dict, torch.Tensor, int]:
    torch.manual_seed(0)
    _, model = tiny_model(f"model.moe.router={router}", "model.pattern=M*-E*E", f"model.mlp.activation={mlp}",
                          f"model.moe.activation={mlp}")
    apply_policy(model, parse_policy(policy))
    batch = _batch()
    saved = saved_activation_bytes(model, batch)
    model.zero_grad()
    for layer in model.moe_layers():
        layer.tokens_per_expert.zero_()
    loss, _ = model.loss(batch["tokens"], batch["labels"], batch["seq_idx"])
    loss.backward()
    counts = torch.stack([layer.tokens_per_expert.clone() for layer in model.moe_layers()])
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}, counts, saved


@pytest.mark.parametrize("router", ["sigmoid_bias", "softmax_aux"])
@pytest.mark.parametrize("policy, mlp", [("full", "swiglu"), ("mamba,moe", "swiglu"), ("attention,mlp", "swiglu"),
                                         ("mlp_act,mamba_norm,mamba_conv,mamba_states", "swiglu"), ("mlp_act,mamba_norm", "relu2"),
                                         ("attention,mlp_act", "swiglu"), ("mamba_norm", "swiglu")])
def test_recomputation_gives_the_same_loss_gradients_and_routing_counts(policy, mlp, router):
    loss0, grads0, counts0, saved0 = _step("none", router, mlp)
    loss, grads, counts, saved = _step(policy, router, mlp)
    assert loss == pytest.approx(loss0, rel=1e-6)
    assert grads.keys() == grads0.keys()
    for name in grads0:
        torch.testing.assert_close(grads[name], grads0[name], rtol=1e-5, atol=1e-7, msg=name)
    assert torch.equal(counts, counts0)  # routed once per forward, not again when recomputed
    assert counts.sum() == 2 * 32 * 2 * 2  # 2 MoE layers x tokens x top_k
    assert saved < saved0  # what autograd keeps outside the recomputed blocks


def test_full_recomputation_keeps_a_fraction_of_the_activations():
    _, _, _, saved0 = _step("none", "sigmoid_bias")
    _, _, _, saved = _step("full", "sigmoid_bias")
    assert saved < saved0 / 4, (saved, saved0)


@pytest.mark.parametrize("value, message", [
    ("mamba,ssm", r"trainer.recompute='mamba,ssm': unknown block kind\(s\) \['ssm'\]"),
    (",", r"trainer.recompute=',': unknown block kind"),
])
def test_bad_policy_is_a_config_error(value, message):
    with pytest.raises(ConfigError, match=message):
        validate(load_config(["configs/demo.yaml"], [f"trainer.recompute={value}"]))


@pytest.mark.parametrize("mlp", ["swiglu", "relu2"])
def test_recomputed_parts_under_bf16_autocast_match_the_plain_model(mlp):
    """The parts' hand-written backward under autocast: bf16 GEMMs and the weight gradients back in
    the float32 parameters' dtype, within bf16 rounding of the plain model's (same autocast)."""
    grads = []
    for policy in ("none", "mlp_act,mamba_norm"):
        torch.manual_seed(0)
        _, model = tiny_model("model.pattern=M*-E", f"model.mlp.activation={mlp}")
        apply_policy(model, parse_policy(policy))
        batch = _batch()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = model.loss(batch["tokens"], batch["labels"], batch["seq_idx"])
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g0 in grads[0].items():
        g = grads[1][name]
        assert g.dtype == g0.dtype == torch.float32, name
        assert (g - g0).norm() <= 2e-2 * g0.norm() + 1e-6, name  # bf16 rounding (8 bits), a few ops deep


def test_a_part_without_layers_to_act_on_is_an_error():
    _, model = tiny_model("model.pattern=M*M")  # no MLP, no MoE
    with pytest.raises(ValueError, match="mlp_act, but this model build has no layer"):
        apply_policy(model, parse_policy("mlp_act"))


def test_mamba_parts_reach_the_mixer_core(monkeypatch):
    """mamba_conv and mamba_states are flags the mixer hands to kernels.mamba_inner (whose own test
    checks the same bits with less kept, tests/kernels/test_kern_triton_interp.py), and mamba_norm asks
    it for the SSD output the norm reruns from: every mixer passes them, only when asked."""
    import pretrain.layers.mamba as mamba_layer

    seen = []
    real = mamba_layer.mamba_inner

    def spy(*args, **kwargs):
        seen.append((kwargs["recompute_conv"], kwargs["recompute_states"], kwargs["return_y"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(mamba_layer, "mamba_inner", spy)
    for policy, expected in (("none", (False, False, False)), ("mamba_states", (False, True, False)),
                             ("mamba_conv", (True, False, False)), ("mamba_norm", (False, False, True)),
                             ("mamba_norm,mamba_conv,mamba_states", (True, True, True))):
        seen.clear()
        _, model = tiny_model("model.pattern=M*M-")
        apply_policy(model, parse_policy(policy))
        batch = _batch()
        model.loss(batch["tokens"], batch["labels"], batch["seq_idx"])
        assert seen == [expected, expected], (policy, seen)


def test_parts_apply_across_pipeline_chunks():
    """Pipeline stages are chunks of one model: a part needs a layer in some chunk, not in every one."""
    _, with_mamba = tiny_model("model.pattern=M-")
    _, without = tiny_model("model.pattern=*-")
    apply_policy([with_mamba, without], parse_policy("mamba_states,mlp"))
    mixers = [m for m in with_mamba.modules() if hasattr(type(m), "recompute_states")]
    assert mixers and all(m.recompute_states for m in mixers)
    assert with_mamba.recompute_kinds == without.recompute_kinds == frozenset({"mamba_states", "mlp"})
    with pytest.raises(ValueError, match="names mamba_states, but this model build has no layer"):
        apply_policy([without], parse_policy("mamba_states"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gated", [True, False])
def test_mlp_activation_vjp_gives_autograd_bits(dtype, gated):
    """mlp_act's explicit backward (no torch.autograd.grad inside a backward, so torch.compile traces
    it) runs the same aten ops as autograd on the activation: the same bits in float32 and bf16."""
    from pretrain.layers.mlp import _act, _act_with_vjp

    gen = torch.Generator().manual_seed(3)
    gate = torch.randn(64, 96, generator=gen).to(dtype).requires_grad_(True) if gated else None
    up = torch.randn(64, 96, generator=gen).to(dtype).requires_grad_(True)
    d_act = torch.randn(64, 96, generator=gen).to(dtype)
    out = _act(gate, up)
    expected = torch.autograd.grad(out, [t for t in (gate, up) if t is not None], d_act)
    got_out, vjp = _act_with_vjp(gate, up)
    got = [g for g in vjp(d_act) if g is not None]
    assert torch.equal(got_out, out)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert torch.equal(_act_with_vjp(gate, up, rerun=True)[0], out)  # the backward's rerun: other nodes, same bits


@pytest.mark.parametrize("activation", ["swiglu", "relu2"])
def test_mlp_act_keeps_no_activation_under_compile_with_a_cse_blind_to_the_backward(activation, monkeypatch):
    """torch 2.11's AOTAutograd (the GPU machine's) runs common-subexpression elimination over the
    joint forward+backward graph without telling the two apart (this CPU's torch 2.14 keys by it):
    an mlp_act rerun made of the forward's very nodes was merged into the forward's product, and the
    partitioner kept that (bench/NOTES_train.md Run 26: mlp_act saved ~0.1 GB on an H100, not 4).
    Compiled here (Inductor, CPU) with that older CSE, the MLP with mlp_act keeps one (tokens, d_ff)
    tensor fewer for its backward than without."""
    import torch._functorch.partitioners as partitioners
    from torch._functorch.compile_utils import fx_graph_cse

    from pretrain.layers.mlp import MLP

    monkeypatch.setattr(partitioners, "fx_graph_cse", lambda graph, extra_node_key=None: fx_graph_cse(graph))
    tokens, d_ff = 512, 256

    def kept_activations(recompute: bool) -> int:
        torch.manual_seed(0)
        mlp = MLP(64, d_ff, activation)
        mlp.recompute_act = recompute
        x = torch.randn(tokens, 64, requires_grad=True)
        kept = []

        def pack(t):
            kept.append(tuple(t.shape))
            return t

        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = torch.compile(mlp, backend="inductor", fullgraph=True)(x)
            out.sum().backward()
        finally:
            torch._dynamo.reset()
        return kept.count((tokens, d_ff))

    assert kept_activations(True) == kept_activations(False) - 1


@pytest.mark.parametrize("bias", [False, True])
def test_linear_of_rerun_gives_the_linear_gradients_without_keeping_its_input(bias):
    """linear_of_rerun(x, rerun, inputs, linear): the output and every gradient of linear(x), with the
    gradient of x going back along x's own graph, while the tensors kept for the backward are
    `inputs` and the weight, not x (rerun remakes it there)."""
    from pretrain.recompute import linear_of_rerun

    gen = torch.Generator().manual_seed(4)
    source = torch.randn(6, 5, 16, generator=gen, requires_grad=True)

    def make(t):
        return torch.tanh(t) * 2

    lin = torch.nn.Linear(16, 8, bias=bias)
    seed = torch.randn(6, 5, 8, generator=gen)
    expected_out = lin(make(source))
    expected = torch.autograd.grad((expected_out * seed).sum(), [source, *lin.parameters()])
    kept = []

    def pack(t):
        kept.append(t)
        return t

    x = make(source)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = linear_of_rerun(x, make, (source.detach(),), lin)
    x_kept_by_the_linear = [t for t in kept if t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()]
    got = torch.autograd.grad((out * seed).sum(), [source, *lin.parameters()])
    assert torch.equal(out, expected_out)
    assert not x_kept_by_the_linear
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
