"""pretrain/chunked_loss.py against the unchunked head + lm_loss: values, gradients, dtypes, memory.

Reference: lm_loss(nn.functional.linear(hidden, weight), labels, z) with autograd. float64 compares at
1e-10; float32 at 1e-5 relative to the largest entry (both sides sum the same products in float32 in
other orders: a few ulps, ~1e-7, per entry). Memory: the tensors autograd saves for backward and the
largest tensor any op creates, both without a (tokens, vocab) tensor when chunked.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from pretrain.chunked_loss import AUTO_CHUNK_TOKENS, chunked_lm_loss, resolve_chunk_tokens
from pretrain.loss import IGNORE_INDEX, lm_loss

VOCAB, D_MODEL = 97, 24


def make_inputs(batch: int, seqlen: int, dtype: torch.dtype, seed: int = 0, ignore_fraction: float = 0.3):
    """hidden (batch, seqlen, d_model), weight (vocab, d_model) leaves; labels with some -100."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seqlen, D_MODEL, generator=gen, dtype=dtype).requires_grad_()
    weight = (torch.randn(VOCAB, D_MODEL, generator=gen, dtype=dtype) * 0.5).requires_grad_()
    labels = torch.randint(0, VOCAB, (batch, seqlen), generator=gen)
    labels[torch.rand(batch, seqlen, generator=gen) < ignore_fraction] = IGNORE_INDEX
    return hidden, weight, labels


def loss_and_grads(fn, hidden, weight, labels, z, scale=0.37):
    """(loss, ce, d(scale x loss)/d hidden, d(scale x loss)/d weight); scale stands for grad accumulation."""
    loss, ce = fn(hidden, weight, labels, z)
    grad_hidden, grad_weight = torch.autograd.grad(loss * scale, (hidden, weight))
    return loss.detach(), ce, grad_hidden, grad_weight


def reference(hidden, weight, labels, z):
    return lm_loss(torch.nn.functional.linear(hidden, weight), labels, z)


def chunked(chunk):
    return lambda hidden, weight, labels, z: chunked_lm_loss(hidden, weight, labels, z, chunk)


def assert_match(got, want, rel):
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=rel, atol=rel * float(w.abs().max()))


# (batch, seqlen, chunk): chunk dividing the tokens, not dividing them, one token, larger than all tokens
SHAPES = [(2, 16, 8), (3, 13, 5), (2, 7, 1), (2, 9, 1000)]


@pytest.mark.parametrize("batch, seqlen, chunk", SHAPES)
@pytest.mark.parametrize("z", [0.0, 0.05])
def test_float64_equals_unchunked(batch, seqlen, chunk, z):
    hidden, weight, labels = make_inputs(batch, seqlen, torch.float64)
    assert_match(loss_and_grads(chunked(chunk), hidden, weight, labels, z),
                 loss_and_grads(reference, hidden, weight, labels, z), rel=1e-10)


@pytest.mark.parametrize("batch, seqlen, chunk", SHAPES)
@pytest.mark.parametrize("z", [0.0, 0.05])
def test_float32_equals_unchunked(batch, seqlen, chunk, z):
    hidden, weight, labels = make_inputs(batch, seqlen, torch.float32, seed=1)
    assert_match(loss_and_grads(chunked(chunk), hidden, weight, labels, z),
                 loss_and_grads(reference, hidden, weight, labels, z), rel=1e-5)


def test_normalised_by_the_whole_micro_batch():
    """Chunks with very different label counts: the mean is over all labelled tokens, not per chunk."""
    hidden, weight, labels = make_inputs(1, 20, torch.float64, ignore_fraction=0.0)
    labels[0, :9] = IGNORE_INDEX  # chunk 0 (10 tokens) has one label, chunk 1 has ten
    assert_match(loss_and_grads(chunked(10), hidden, weight, labels, 0.05),
                 loss_and_grads(reference, hidden, weight, labels, 0.05), rel=1e-10)


def test_tied_weight_accumulates_both_gradients():
    """The head's weight also feeds an embedding lookup: its gradient is the sum of both paths."""
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(VOCAB, D_MODEL, generator=gen, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, VOCAB, (2, 11), generator=gen)
    labels = torch.roll(tokens, -1, dims=1)
    mix = torch.randn(D_MODEL, D_MODEL, generator=gen, dtype=torch.float64)
    grads = []
    for fn in (reference, chunked(4)):
        hidden = torch.tanh(torch.nn.functional.embedding(tokens, weight) @ mix)
        loss, _ = fn(hidden, weight, labels, 0.01)
        grads.append(torch.autograd.grad(loss, weight)[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-12)


def test_no_labelled_token_gives_zero_loss_and_gradients():
    hidden, weight, labels = make_inputs(2, 5, torch.float64)
    labels.fill_(IGNORE_INDEX)
    loss, ce, grad_hidden, grad_weight = loss_and_grads(chunked(3), hidden, weight, labels, 0.05)
    assert float(loss) == 0.0 and float(ce) == 0.0
    assert not grad_hidden.any() and not grad_weight.any()


def test_without_grad_only_the_value():
    hidden, weight, labels = make_inputs(3, 13, torch.float64)
    with torch.no_grad():
        loss, ce = chunked_lm_loss(hidden, weight, labels, 0.05, 4)
        want, want_ce = reference(hidden, weight, labels, 0.05)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=0)
    torch.testing.assert_close(ce, want_ce, rtol=1e-10, atol=0)


def test_frozen_weight_gets_no_gradient():
    hidden, weight, labels = make_inputs(2, 6, torch.float64)
    weight.requires_grad_(False)
    loss, _ = chunked_lm_loss(hidden, weight, labels, 0.0, 5)
    (grad_hidden,) = torch.autograd.grad(loss, hidden)
    want, _ = reference(hidden, weight, labels, 0.0)
    torch.testing.assert_close(grad_hidden, torch.autograd.grad(want, hidden)[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                             reason="needs CUDA")])])
def test_bf16_autocast_multiplies_in_bf16(device):
    """On CUDA the per-chunk softmax and logit gradient are the Triton kernel (kernels/cross_entropy).
    Under autocast the logits are a bf16 matmul, as nn.functional.linear's: the loss matches the
    autocast reference to float32 rounding (float32 logits would differ by ~1e-3). Gradients come
    back in the parameters' float32 and agree to bf16 accuracy: both multiply bf16-rounded d logits,
    but the reference rounds (scale x d logits) and this rounds d logits then scales in float32, and d
    weight sums one bf16 product per chunk in float32 where the reference rounds the whole sum once."""
    hidden, weight, labels = (t.detach().to(device).requires_grad_(t.requires_grad)
                              for t in make_inputs(4, 32, torch.float32, seed=3, ignore_fraction=0.1))
    with torch.autocast(device, dtype=torch.bfloat16):
        got = loss_and_grads(chunked(48), hidden, weight, labels, 1e-3)
        want = loss_and_grads(reference, hidden, weight, labels, 1e-3)
    fp32 = loss_and_grads(reference, hidden, weight, labels, 1e-3)
    assert abs(float(fp32[0] - want[0])) > 1e-4  # the test can tell bf16 logits from float32 ones
    assert got[2].dtype == got[3].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=0)
    for g, w in zip(got[2:], want[2:]):
        torch.testing.assert_close(g, w, rtol=0, atol=2**-6 * float(w.abs().max()))


def saved_bytes(fn, hidden, weight, labels):
    """(total bytes, largest numel) of the tensors autograd saves for backward during fn's forward."""
    sizes = []

    def pack(t):
        sizes.append((t.numel() * t.element_size(), t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(hidden, weight, labels, 0.01)
    return sum(b for b, _ in sizes), max(n for _, n in sizes)


class LargestTensor(TorchDispatchMode):
    """Records the largest numel of any tensor an op returns while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.largest = max([self.largest, *sizes])
        return out


def test_no_tokens_by_vocab_tensor_is_saved_or_created():
    batch, seqlen, chunk, vocab = 4, 128, 64, 2048
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(batch, seqlen, D_MODEL, generator=gen).requires_grad_()
    weight = (torch.randn(vocab, D_MODEL, generator=gen) * 0.1).requires_grad_()
    labels = torch.randint(0, vocab, (batch, seqlen), generator=gen)
    tokens_by_vocab = batch * seqlen * vocab

    ref_bytes, ref_largest = saved_bytes(reference, hidden, weight, labels)
    got_bytes, got_largest = saved_bytes(chunked(chunk), hidden, weight, labels)
    assert ref_largest >= tokens_by_vocab  # the reference keeps float32 logits for backward
    assert got_largest <= max(batch * seqlen, vocab) * D_MODEL  # only d hidden and d weight
    assert got_bytes * 10 < ref_bytes

    for fn, bound in ((reference, tokens_by_vocab), (chunked(chunk), chunk * vocab)):
        with LargestTensor() as mode:
            loss, _ = fn(hidden, weight, labels, 0.01)
            loss.backward()
        if fn is reference:
            assert mode.largest >= bound
        else:
            assert mode.largest <= bound


def test_chunk_setting_resolution():
    assert resolve_chunk_tokens(None, torch.device("cuda")) == AUTO_CHUNK_TOKENS
    assert resolve_chunk_tokens(None, torch.device("cpu")) == 0  # keeps the CPU golden losses exact
    assert resolve_chunk_tokens(0, torch.device("cuda")) == 0
    assert resolve_chunk_tokens(128, torch.device("cpu")) == 128
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_lm_loss(*make_inputs(1, 3, torch.float64), 0.0, 0)


@pytest.mark.parametrize("tied", [False, True])
def test_model_loss_chunked_equals_unchunked(tied):
    """HybridLM.loss with loss_chunk_tokens set: the same loss and every parameter gradient (float64),
    tied embeddings included (the head's gradient adds into embeddings.weight)."""
    from tiny_models import tiny_model

    torch.manual_seed(5)
    cfg, model = tiny_model(f"model.tie_embeddings={str(tied).lower()}")
    model.double()
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 32))
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, -3:] = IGNORE_INDEX
    results = []
    for chunk in (0, 24):
        model.loss_chunk_tokens = chunk
        model.zero_grad(set_to_none=True)
        loss, ce = model.loss(tokens, labels, z_loss_coeff=1e-2)
        loss.backward()
        results.append((loss.detach(), ce, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss0, ce0, grads0), (loss1, ce1, grads1) = results
    torch.testing.assert_close(loss1, loss0, rtol=1e-10, atol=0)
    torch.testing.assert_close(ce1, ce0, rtol=1e-10, atol=0)
    assert grads1.keys() == grads0.keys() and ("lm_head.weight" in grads0) != tied
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-9, atol=1e-12, msg=name)


def test_engine_sets_the_chunk_from_the_config():
    from tiny_models import tiny_config
    from parallel.engine import Engine
    from pretrain.config import validate

    for setting, expected in (("null", 0), ("0", 0), ("40", 40)):  # null = auto: off on CPU
        cfg = tiny_config(f"trainer.loss_chunk_tokens={setting}")
        engine = Engine(cfg, validate(cfg), torch.device("cpu"), parallel=False)
        assert engine.model.loss_chunk_tokens == expected
