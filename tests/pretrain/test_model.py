"""HybridLM behaviour: shapes, causality of every mixer, document isolation under packing, MoE routing."""
from __future__ import annotations

import pytest
import torch

from saved_tensor_count import SavedTensorCount
from tiny_models import tiny_config, tiny_model
from pretrain.config import validate
from pretrain.layers.moe import MoE
from pretrain.model import HybridLM

@pytest.fixture(autouse=True)
def _float64():
    """float64 in these tests only: exact comparisons, any leak shows far above rounding."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def test_forward_shape_and_param_names():
    cfg, model = tiny_model()
    tokens = torch.randint(0, 64, (2, 32))
    assert model(tokens).shape == (2, 32, 64)
    names = dict(model.named_parameters())
    assert "layers.0.mixer.A_log" in names and "layers.1.mixer.q_proj.weight" in names
    assert "layers.3.mixer.experts.0.up_proj.weight" in names and "norm_f.weight" in names


@pytest.mark.parametrize("pattern", ["M", "*", "-", "E", "M*-E"])
def test_each_mixer_is_causal(pattern):
    cfg, model = tiny_model(f"model.pattern={pattern}", "model.moe.router=softmax_aux")
    model.eval()
    tokens = torch.randint(0, 64, (2, 32))
    changed = tokens.clone()
    changed[:, 20:] = torch.randint(0, 64, (2, 12))
    a, b = model(tokens), model(changed)
    assert torch.allclose(a[:, :20], b[:, :20], atol=1e-10, rtol=0)
    assert not torch.allclose(a[:, 20:], b[:, 20:])


@pytest.mark.parametrize("pattern", ["M", "*", "M*-E"])
def test_packed_documents_do_not_see_each_other(pattern):
    """Running two documents packed in one row equals running each alone."""
    cfg, model = tiny_model(f"model.pattern={pattern}")
    model.eval()
    doc_a, doc_b = torch.randint(0, 64, (1, 13)), torch.randint(0, 64, (1, 19))
    packed = torch.cat([doc_a, doc_b], dim=1)
    seq_idx = torch.cat([torch.zeros(1, 13), torch.ones(1, 19)], dim=1).to(torch.int32)
    out_packed = model(packed, seq_idx)
    assert torch.allclose(out_packed[:, :13], model(doc_a), atol=1e-9, rtol=0)
    assert torch.allclose(out_packed[:, 13:], model(doc_b), atol=1e-9, rtol=0)


def _moe(router: str, **extra) -> MoE:
    cfg = tiny_config("model.pattern=E", f"model.moe.router={router}",
                      *[f"model.moe.{k}={v}" for k, v in extra.items()])
    moe = MoE(cfg.model.d_model, cfg.model.moe, validate(cfg).moe_shared_d_ff)
    torch.nn.init.normal_(moe.gate.weight, std=0.2)  # HybridLM initialises it; a bare MoE leaves it empty
    return moe


def _reference_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token-by-token evaluation of the routing rule as written in the module docstring."""
    cfg = moe.cfg
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        logits = moe.gate.weight @ x[t]
        if cfg.router == "sigmoid_bias":
            scores = torch.sigmoid(logits)
            chosen = torch.topk(scores + moe.gate.expert_bias, cfg.top_k).indices
            w = scores[chosen]
        else:
            probs = torch.softmax(logits, -1)
            chosen = torch.topk(probs, cfg.top_k).indices
            w = probs[chosen]
        if cfg.norm_topk_prob:
            w = w / w.sum()
        w = w * cfg.routed_scaling_factor
        for e, we in zip(chosen.tolist(), w):
            out[t] += we * moe.experts[e](x[t])
        if moe.shared_experts is not None:
            out[t] += moe.shared_experts(x[t])
    return out


@pytest.mark.parametrize("router", ["sigmoid_bias", "softmax_aux"])
def test_moe_routes_as_specified(router):
    moe = _moe(router, num_shared_experts=1, routed_scaling_factor=2.5)
    moe.gate.expert_bias.copy_(torch.randn(4))
    x = torch.randn(1, 10, 32)
    assert torch.allclose(moe(x)[0], _reference_moe(moe, x[0]), atol=1e-10)


def test_moe_load_counts_and_bias_update():
    moe = _moe("sigmoid_bias", bias_update_rate=0.5)
    x = torch.randn(1, 12, 32)
    moe(x)
    load = moe.update_expert_bias()
    assert load.sum() == 12 * 2  # every token routed to top_k experts
    expected = 0.5 * torch.sign(load.mean() - load)
    assert torch.equal(moe.gate.expert_bias, expected.to(moe.gate.expert_bias.dtype))
    assert moe.tokens_per_expert.sum() == 0


def test_moe_slot_counts_match_a_loop_and_compile_without_breaks():
    """The per-expert counts (load, dropped slots, dispatch sizes) against counting by hand, and the
    router with its bookkeeping under torch.compile is one graph: the counts have a fixed size (with
    torch.bincount, a data-dependent size, dynamo broke the MoE block at each count)."""
    import torch._dynamo

    from pretrain.layers.moe import route_and_count, slots_per_expert, sort_slots_by_expert

    gen = torch.Generator().manual_seed(1)
    indices = torch.randint(0, 5, (13, 2), generator=gen)
    where = torch.rand(13, 2, generator=gen) > 0.5
    by_hand = [int((indices == e).sum()) for e in range(6)]
    assert slots_per_expert(indices, 6).tolist() == by_hand
    assert slots_per_expert(indices, 6, where).tolist() == [int(((indices == e) & where).sum()) for e in range(6)]
    order, counts = sort_slots_by_expert(indices, 6)
    assert counts.tolist() == by_hand and torch.equal(indices.flatten()[order], indices.flatten().sort().values)

    moe = _moe("sigmoid_bias", capacity_factor=1.0)
    x = torch.randn(12, 32)

    def routing(x):
        indices, weights, keep = route_and_count(moe, x)
        return sort_slots_by_expert(indices, moe.cfg.num_experts)[1], keep

    explained = torch._dynamo.explain(routing)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert moe.tokens_per_expert.sum() == 12 * 2 and moe.dropped_per_expert.sum() > 0


def test_softmax_aux_loss_value():
    moe = _moe("softmax_aux", aux_loss_coeff=0.1)
    x = torch.randn(1, 16, 32)
    moe(x)
    probs = torch.softmax(x[0] @ moe.gate.weight.T, -1)
    chosen = torch.topk(probs, 2).indices
    f = torch.stack([(chosen == e).sum() for e in range(4)]).double() / chosen.numel()
    assert torch.allclose(moe.aux_loss, 0.1 * 4 * (f * probs.mean(0)).sum())


def test_tied_embeddings_share_the_weight():
    cfg, model = tiny_model("model.tie_embeddings=true")
    assert model.lm_head is None and model.output_weight() is model.embeddings.weight


@pytest.mark.parametrize("entry", ["loss", "forward"])
def test_a_forward_without_backward_leaves_no_graph_alive(entry):
    """After a forward under grad mode whose results are dropped (bench/train.py's forward timing, a
    user's probe), no module may hold a tensor of its autograd graph: the MoE aux loss stored on each
    layer did, and with it every block's saved activations up to that layer, into the next step."""
    import gc

    cfg, model = tiny_model("model.pattern=M*-E", "model.moe.router=softmax_aux")
    tokens = torch.randint(0, 64, (2, 32))
    count = SavedTensorCount()
    with count.hooks():
        out = model.loss(tokens, tokens) if entry == "loss" else model(tokens)
    assert len(count.alive) > 0  # the graph saved activations
    del out
    gc.collect()
    assert len(count.alive) == 0


def test_the_loss_still_carries_the_aux_loss():
    """model.loss = cross-entropy + the MoE load-balancing losses it takes from the layers."""
    cfg, model = tiny_model("model.pattern=EE", "model.moe.router=softmax_aux", "model.moe.aux_loss_coeff=0.5")
    tokens = torch.randint(0, 64, (2, 32))
    loss, ce = model.loss(tokens, tokens)
    assert all(layer.mixer.aux_loss is None for layer in model.layers)  # taken by the loss
    hidden = model.embeddings(tokens)
    aux = 0.0
    for layer in model.layers:  # each layer's aux loss by hand from its router, on the same inputs
        x = layer.norm(hidden).reshape(-1, hidden.shape[-1])
        _, _, layer_aux = layer.mixer.gate(x)
        aux = aux + layer_aux
        hidden = layer(hidden, None)
    torch.testing.assert_close(loss, ce + aux, rtol=1e-12, atol=0)
    loss.backward()
    assert all(layer.mixer.gate.weight.grad.abs().sum() > 0 for layer in model.layers)
