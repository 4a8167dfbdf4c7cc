"""Context parallelism (`parallel.cp`): Ulysses all-to-all between sequence shards and head shards.

Layout. Every cp rank of a data-parallel replica receives the same micro-batch (the loader's dp rank
ignores cp; the model splits): rank r keeps positions [r * s/cp, (r + 1) * s/cp) of tokens and labels
(`local_shard`), so the residual stream is (s/cp[/tp under SP], batch, d_model) and everything
per-token (embedding, norms, MLP, MoE, in/out projections, head, cross-entropy) runs on the shard.
seq_idx stays whole on every rank (it came with the batch), so document boundaries anywhere, also
across shard boundaries, are seen identically by every rank.

Mixers that need whole sequences exchange shards for heads (DeepSpeed-Ulysses):
    seq_to_heads: (s/cp, batch, H, D) -> (s, batch, H/cp, D)   sequence gathered, heads scattered
    heads_to_seq: (s, batch, H/cp, D) -> (s/cp, batch, H, D)   the inverse (also each one's backward)
Attention runs its core over the whole sequence on H/cp heads; the Mamba-2 mixer sends x, B, C and
dt (packed into one exchange), runs conv1d + SSD scan on whole sequences for nheads/cp heads, and
sends y back before the gated norm and out_proj. Groups (Mamba B/C, attention k/v) fewer than cp are
repeated first (`repeat_groups`) so that each rank receives the group its heads use; the gradient
of the repeat sums the copies.

The layout of the exchange is DeepSpeed's (deepspeed.sequence.layer's Ulysses pre/post all-to-all
reshapes, seq-first `batch_dim_idx=1`); the collective itself is torch.distributed's
all_to_all_single on megatron's cp group. DeepSpeed's `_SeqAllToAll` sends through deepspeed.comm,
whose backend exists only after `deepspeed.init_distributed`, which on CPU JIT-compiles a
shared-memory op (see /work/shared/notes/cpu-facts.md); this module avoids that.

Gradients: parameters are replicated over cp, so megatron DDP reduces them over dp x cp (its
dp_cp group, with a 1/(dp*cp) factor); the model's loss on a cp rank is cp x (its shard's share of
the replica's token-mean), so that average is the replica's gradient (parallel/model.py).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from parallel import state


def _layout():
    from deepspeed.sequence.layer import _generate_layout_params, post_all2all, pre_all2all_fun

    return _generate_layout_params, pre_all2all_fun, post_all2all


def _all_to_all(x: torch.Tensor, scatter_idx: int, gather_idx: int, group) -> torch.Tensor:
    """DeepSpeed's seq-first Ulysses all-to-all over `group` with torch.distributed."""
    generate, pre, post = _layout()
    world = dist.get_world_size(group)
    pre_perm, pre_shape, post_perm, post_shape = generate(scatter_idx, 1, world, x)
    send = pre(pre_perm, pre_shape, x)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return post(post_perm, post_shape)(recv)


class _UlyssesAllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scatter_idx: int, gather_idx: int, group):
        ctx.scatter_idx, ctx.gather_idx, ctx.group = scatter_idx, gather_idx, group
        return _all_to_all(x.contiguous(), scatter_idx, gather_idx, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_to_all(grad.contiguous(), ctx.gather_idx, ctx.scatter_idx, ctx.group), None, None, None


def seq_to_heads(x: torch.Tensor) -> torch.Tensor:
    """(s/cp, batch, H, D) -> (s, batch, H/cp, D): this rank gets heads [r*H/cp, (r+1)*H/cp) of the
    whole sequence (positions in rank order)."""
    return _UlyssesAllToAll.apply(x, 2, 0, state.cp_group())


def heads_to_seq(x: torch.Tensor) -> torch.Tensor:
    """(s, batch, H/cp, D) -> (s/cp, batch, H, D), the inverse of seq_to_heads."""
    return _UlyssesAllToAll.apply(x, 0, 2, state.cp_group())


def repeat_groups(x: torch.Tensor, num_groups: int, dim: int) -> torch.Tensor:
    """x with `num_groups` equal groups along `dim` -> max(num_groups, cp) groups: each group repeated
    cp / num_groups times when there are fewer groups than cp ranks (so heads r*H/cp.. of rank r find
    their group in the r-th slice); unchanged otherwise."""
    cp = state.cp_size()
    if num_groups >= cp:
        return x
    dim = dim % x.ndim
    shape = list(x.shape)
    grouped = x.reshape(*shape[:dim], num_groups, shape[dim] // num_groups, *shape[dim + 1:])
    repeated = grouped.repeat_interleave(cp // num_groups, dim=dim)
    shape[dim] = shape[dim] * (cp // num_groups)
    return repeated.reshape(shape)


def group_slice(num_groups: int) -> tuple[list[int], int]:
    """The local groups (indices into `num_groups`) whose data this cp rank holds after
    repeat_groups + seq_to_heads, and how many that is."""
    cp, rank = state.cp_size(), state.cp_rank()
    expanded = max(num_groups, cp)
    per_rank = expanded // cp
    groups = [(rank * per_rank + j) * num_groups // expanded for j in range(per_rank)]
    return groups, per_rank


def local_shard(t: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """This cp rank's contiguous slice of the sequence dimension `dim` (the whole tensor at cp=1)."""
    cp = state.cp_size()
    if cp == 1:
        return t
    size = t.shape[dim]
    if size % cp:
        raise ValueError(f"sequence length {size} is not divisible by parallel.cp={cp}")
    return t.narrow(dim, state.cp_rank() * (size // cp), size // cp)
