"""The causal conv1d reference against an independent per-position loop, and document isolation."""

import pytest
import torch
import torch.nn.functional as F

from kernels.conv1d.reference import causal_conv1d, causal_conv1d_update


def loop_conv(x, w, b, seq_idx, act):
    batch, seqlen, dim = x.shape
    width = w.shape[1]
    out = torch.zeros(batch, seqlen, dim, dtype=torch.float64)
    for bi in range(batch):
        for t in range(seqlen):
            acc = b.double().clone() if b is not None else torch.zeros(dim, dtype=torch.float64)
            for k in range(width):
                s = t - (width - 1) + k
                if s < 0:
                    continue
                if seq_idx is not None and seq_idx[bi, s] != seq_idx[bi, t]:
                    continue
                acc += w[:, k].double() * x[bi, s].double()
            out[bi, t] = F.silu(acc) if act == "silu" else acc
    return out


def rand_seq(batch, seqlen):
    s = torch.zeros(batch, seqlen, dtype=torch.int32)
    for bi in range(batch):
        for c in torch.randint(1, seqlen, (3,)).tolist():
            s[bi, c:] += 1
    return s


@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("act", [None, "silu"])
@pytest.mark.parametrize("use_seq", [False, True])
def test_conv_matches_loop(width, act, use_seq):
    x = torch.randn(2, 19, 6, dtype=torch.float64)
    w = torch.randn(6, width, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64) if width != 3 else None
    seq = rand_seq(2, 19) if use_seq else None
    out = causal_conv1d(x, w, b, seq_idx=seq, activation=act)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, loop_conv(x, w, b, seq, act), rtol=1e-12, atol=1e-12)


def test_no_cross_document_leakage():
    x = torch.randn(1, 30, 4)
    w, b = torch.randn(4, 4), torch.randn(4)
    seq = torch.zeros(1, 30, dtype=torch.int32)
    seq[:, 11:] = 1
    out = causal_conv1d(x, w, b, seq_idx=seq, activation="silu")
    x2 = x.clone()
    x2[:, :11] = torch.randn(1, 11, 4) * 100
    out2 = causal_conv1d(x2, w, b, seq_idx=seq, activation="silu")
    assert torch.equal(out[:, 11:], out2[:, 11:])
    # the second document alone, from scratch, gives the same result
    alone = causal_conv1d(x[:, 11:], w, b, activation="silu")
    torch.testing.assert_close(out[:, 11:], alone)


def test_float32_and_gradients():
    x = torch.randn(2, 13, 5, requires_grad=True)
    w = torch.randn(5, 4, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    out = causal_conv1d(x, w, b, seq_idx=rand_seq(2, 13), activation="silu")
    assert out.dtype == torch.float32
    out.sum().backward()
    assert x.grad is not None and w.grad is not None and b.grad is not None


@pytest.mark.parametrize("width", [2, 4])
def test_update_matches_full_conv(width):
    """Decoding step by step reproduces the full convolution."""
    x = torch.randn(3, 11, 7, dtype=torch.float64)
    w, b = torch.randn(7, width, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    full = causal_conv1d(x, w, b, activation="silu")
    state = torch.zeros(3, 7, width - 1, dtype=torch.float64)
    outs = [causal_conv1d_update(x[:, t], state, w, b, activation="silu") for t in range(11)]
    torch.testing.assert_close(torch.stack(outs, 1), full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, x[:, -(width - 1):].transpose(1, 2))


def test_bad_width_raises():
    with pytest.raises(ValueError, match="width"):
        causal_conv1d(torch.randn(1, 4, 3), torch.randn(3, 5))
