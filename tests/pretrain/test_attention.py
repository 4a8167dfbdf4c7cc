"""Document-masked causal attention: the varlen offsets (CPU) and the FlashAttention varlen path
against SDPA with the dense document mask (GPU)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain.layers import attention as attention_mod
from pretrain.layers.attention import (causal_attention, document_causal_mask, document_cu_seqlens, document_layout,
                                       uses_varlen)


def _random_seq_idx(batch, seqlen, gen, max_docs=6):
    """Rows of nondecreasing document ids with random boundaries (some rows one document)."""
    rows = []
    for _ in range(batch):
        starts = torch.zeros(seqlen, dtype=torch.int32)
        num = int(torch.randint(0, max_docs, (1,), generator=gen))
        if num:
            starts[torch.randint(1, seqlen, (num,), generator=gen)] = 1
        rows.append(starts.cumsum(0).to(torch.int32))
    return torch.stack(rows)


def _offsets_by_loop(seq_idx):
    offsets = []
    for b, row in enumerate(seq_idx.tolist()):
        for i, doc in enumerate(row):
            if i == 0 or doc != row[i - 1]:
                offsets.append(b * len(row) + i)
    return offsets + [seq_idx.numel()]


def test_cu_seqlens_start_each_row_and_each_document():
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    for _ in range(20):
        seq_idx = _random_seq_idx(int(torch.randint(1, 5, (1,), generator=gen)), 37, gen)
        cu = document_cu_seqlens(seq_idx)
        assert cu.dtype == torch.int32
        assert cu.tolist() == _offsets_by_loop(seq_idx)
    # a row continuing the previous row's document id still starts a new document
    assert document_cu_seqlens(torch.zeros(2, 4, dtype=torch.int32)).tolist() == [0, 4, 8]


def test_document_layout_once_per_forward_and_again_after_an_in_place_change(monkeypatch):
    """Three attention layers see one seq_idx: its offsets are computed (one host sync on CUDA) once
    per forward; a new tensor, or the same tensor changed in place, is computed again, and the
    model's output is that of the changed documents."""
    from tiny_models import tiny_model

    calls = []

    def counting(seq_idx):
        calls.append(1)
        return document_cu_seqlens(seq_idx)

    monkeypatch.setattr(attention_mod, "document_cu_seqlens", counting)
    torch.manual_seed(0)
    _, model = tiny_model("model.pattern=*-M*-*", "model.mamba.chunk_size=8")
    tokens = torch.randint(0, 64, (2, 32))
    seq_idx = torch.zeros(2, 32, dtype=torch.int32)
    seq_idx[0, 11:] = 1
    out = model(tokens, seq_idx)
    assert len(calls) == 1
    model(tokens, seq_idx.clone())
    assert len(calls) == 2
    seq_idx[1, 20:] = 1  # in place: the cached layout is stale
    out_changed = model(tokens, seq_idx)
    assert len(calls) == 3
    assert not torch.equal(out, out_changed)
    torch.testing.assert_close(out_changed, model(tokens, seq_idx.clone()), rtol=0, atol=0)


def test_document_layout_one_document_per_row():
    assert document_layout(torch.tensor([[0, 0, 0], [3, 3, 3]], dtype=torch.int32))[0]
    # a row continuing the previous row's document id is one document of its own
    assert document_layout(torch.zeros(2, 5, dtype=torch.int32))[0]
    single, cu = document_layout(torch.tensor([[0, 0, 1], [1, 1, 1]], dtype=torch.int32))
    assert not single and cu.tolist() == [0, 2, 3, 6]


def test_cpu_float32_keeps_the_dense_mask_path():
    assert not uses_varlen(torch.zeros(1, 1, 4, 8))


@pytest.mark.gpu
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(16, 8, 64), (8, 8, 128), (32, 8, 128)])
def test_varlen_matches_dense_mask_in_bf16(heads, kv_heads, head_dim):
    """bf16 varlen forward and q/k/v gradients within 1e-2 (relative, bf16 inputs: ~3 significant
    digits; both sides accumulate in fp32) of the fp32 dense-mask SDPA on the same bf16 inputs."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    batch, seqlen = 3, 1000  # not a multiple of the kernel's blocks
    seq_idx = _random_seq_idx(batch, seqlen, gen)
    seq_idx[0, 333:] += 1  # at least one row of several documents, so the varlen kernel runs
    seq_idx = seq_idx.cuda()
    q = torch.randn(batch, heads, seqlen, head_dim, generator=gen).cuda().bfloat16().requires_grad_()
    k = torch.randn(batch, kv_heads, seqlen, head_dim, generator=gen).cuda().bfloat16().requires_grad_()
    v = torch.randn(batch, kv_heads, seqlen, head_dim, generator=gen).cuda().bfloat16().requires_grad_()
    dout = torch.randn(batch, heads, seqlen, head_dim, generator=gen).cuda()
    assert uses_varlen(q)
    out = causal_attention(q, k, v, seq_idx)
    grads = torch.autograd.grad(out, (q, k, v), dout.bfloat16())
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ref_in, attn_mask=document_causal_mask(seq_idx),
                                         enable_gqa=heads != kv_heads)
    ref_grads = torch.autograd.grad(ref, ref_in, dout)

    def rel(a, b):
        return ((a.float() - b).norm() / b.norm()).item()

    assert out.shape == ref.shape
    assert rel(out, ref) < 1e-2
    for name, g, r in zip("qkv", grads, ref_grads):
        assert rel(g, r) < 1e-2, name


def test_compiled_attention_block_is_one_graph_and_follows_the_documents():
    """An attention residual block under torch.compile: the layout's host sync sits at the block's
    first statement, so dynamo makes one graph of the rest (it made five when the disabled call sat
    in causal_attention); the layout's one-document-per-row flag is guarded, so a batch of packed
    documents after one of whole rows takes the masked path again. Compiled against eager, float32."""
    import torch._dynamo

    from tiny_models import tiny_model

    torch.manual_seed(0)
    _, model = tiny_model("model.pattern=*")
    block = model.layers[0]
    hidden = torch.randn(2, 32, model.layers[0].norm.weight.numel())
    whole_rows = torch.zeros(2, 32, dtype=torch.int32)
    packed = whole_rows.clone()
    packed[0, 11:] = 1
    packed[1, 5:] = 1
    explained = torch._dynamo.explain(block)(hidden, whole_rows)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(block)
    for seq_idx in (whole_rows, packed, whole_rows):
        torch.testing.assert_close(compiled(hidden, seq_idx), block(hidden, seq_idx), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(block(hidden, whole_rows), block(hidden, packed))
