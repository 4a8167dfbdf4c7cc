"""HybridLM's tensor/sequence-parallel build (see pretrain/model.py; `HybridLM(...)` returns this
class when megatron-core's process groups exist).

Residual stream (seqlen[/cp][/tp under SP], batch, d_model). Vocab-parallel embedding (reduce-scatter
into sequence shards under SP), the head multiplies by this rank's vocabulary rows (of lm_head, or
of the embedding when tied), and the loss is megatron-core's vocab-parallel cross-entropy.

Context parallelism: tokens, labels and seq_idx arrive whole (every cp rank of a replica gets the
same micro-batch); the model keeps this cp rank's contiguous sequence shard of tokens and labels
(parallel.context.local_shard) and passes the whole seq_idx to the mixers, which exchange shards
for heads where they need whole sequences. Logits are those of the shard.
"""
from __future__ import annotations

import torch
from torch import nn

from parallel import context, state
from parallel.attention import ParallelAttention
from parallel.common import megatron_config, replicated_part, set_spec, shard_full, spec_of, split_part
from parallel.mamba import ParallelMamba2Mixer
from parallel.mlp import ParallelMLP
from parallel.moe import ParallelMoE
from pretrain.chunked_loss import chunked_lm_loss
from pretrain.config import Derived, ModelConfig
from pretrain.layers.attention import block_layout
from pretrain.loss import IGNORE_INDEX
from pretrain.model import HybridLM
from pretrain.recompute import run_block


def build_parallel_mixer(kind: str, cfg: ModelConfig, derived: Derived, mcfg) -> nn.Module:
    if kind == "mamba":
        return ParallelMamba2Mixer(cfg.d_model, cfg.mamba, norm_eps=cfg.norm_eps, mcfg=mcfg)
    if kind == "attention":
        return ParallelAttention(cfg.d_model, cfg.attention, derived.attention_head_dim, mcfg=mcfg)
    if kind == "mlp":
        return ParallelMLP(cfg.d_model, cfg.mlp.d_ff, cfg.mlp.activation, cfg.mlp.bias, mcfg=mcfg)
    if kind == "moe":
        return ParallelMoE(cfg.d_model, cfg.moe, derived.moe_shared_d_ff, mcfg=mcfg)
    raise ValueError(f"unknown layer kind {kind!r}")


def _norm(d_model: int, eps: float, sequence_parallel: bool) -> nn.RMSNorm:
    norm = nn.RMSNorm(d_model, eps=eps)
    set_spec(norm.weight, 0, replicated_part("", d_model), sequence_parallel=sequence_parallel)
    return norm


class ParallelResidualBlock(nn.Module):
    def __init__(self, kind: str, cfg: ModelConfig, derived: Derived, mcfg):
        super().__init__()
        self.kind = kind
        self.norm = _norm(cfg.d_model, cfg.norm_eps, mcfg.sequence_parallel)
        self.mixer = build_parallel_mixer(kind, cfg, derived, mcfg)

    def forward(self, hidden: torch.Tensor, seq_idx: torch.Tensor | None) -> torch.Tensor:
        extra = block_layout(self.kind, seq_idx)  # first: see pretrain/layers/attention.py
        return hidden + self.mixer(self.norm(hidden), seq_idx, **extra)


class _HeadWeight(nn.Module):
    def __init__(self, vocab_local: int, d_model: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_local, d_model))


class ParallelHybridLM(HybridLM):
    """The whole model, or (pipeline parallelism, parallel/pipeline.py) one model chunk: `layers` the
    global indices of its layers (kept as their names: `layers.7`), `pre_process` whether it holds the
    embedding, `post_process` the final norm, head and loss. `reference_state`: the single-process
    model's state dict to cut the weights from (built here from the current RNG state when None)."""

    def __init__(self, cfg: ModelConfig, derived: Derived, *, parallel: bool | None = None,
                 layers: range | None = None, pre_process: bool = True, post_process: bool = True,
                 reference_state: dict[str, torch.Tensor] | None = None):
        nn.Module.__init__(self)
        from megatron.core.tensor_parallel import VocabParallelEmbedding

        self.cfg = cfg
        if reference_state is None:  # the single-process init, same seed
            reference_state = HybridLM(cfg, derived, parallel=False).state_dict()
        self.mcfg = mcfg = megatron_config(state.config(), num_layers=len(derived.layer_kinds))
        self.sequence_parallel = bool(mcfg.sequence_parallel)
        self.pre_process, self.post_process = pre_process, post_process
        tp = state.tp_size()
        if pre_process:
            self.embeddings = VocabParallelEmbedding(cfg.vocab_size, cfg.d_model, init_method=nn.init.zeros_,
                                                     reduce_scatter_embeddings=self.sequence_parallel, config=mcfg)
            set_spec(self.embeddings.weight, 0, split_part("", cfg.vocab_size))
        elif post_process and cfg.tie_embeddings:
            # pipeline, tied embeddings: the last stage's head is a copy of the first stage's embedding,
            # kept equal by summing the two gradients over megatron's embedding group (Engine.finalize_grads)
            self.embeddings = _HeadWeight(cfg.vocab_size // tp, cfg.d_model)
            set_spec(self.embeddings.weight, 0, split_part("", cfg.vocab_size))
            self.embeddings.weight.shared = True  # megatron's grad norm counts the first stage's copy only
            self.embeddings.weight._hp_pp_replica = 1  # checkpoints save the first stage's copy
        if layers is None:
            self.layers = nn.ModuleList(ParallelResidualBlock(k, cfg, derived, mcfg) for k in derived.layer_kinds)
        else:  # a pipeline chunk: global layer names, so checkpoint keys do not depend on pp
            self.layers = nn.ModuleDict(
                {str(i): ParallelResidualBlock(derived.layer_kinds[i], cfg, derived, mcfg) for i in layers})
            from megatron.core.enums import ModelType

            self.config = mcfg  # megatron's schedules read `config` and `model_type` from every chunk
            self.model_type = ModelType.encoder_or_decoder
            self.input_tensor = None
        if post_process:
            self.norm_f = _norm(cfg.d_model, cfg.norm_eps, self.sequence_parallel)
            self.lm_head = None if cfg.tie_embeddings else _HeadWeight(cfg.vocab_size // tp, cfg.d_model)
            if self.lm_head is not None:
                set_spec(self.lm_head.weight, 0, split_part("", cfg.vocab_size))
        self.load_full_state_dict(reference_state)

    @torch.no_grad()
    def load_full_state_dict(self, full: dict[str, torch.Tensor]) -> None:
        """Copy this rank's pieces of a single-process state dict (any tp)."""
        own = dict(self.named_parameters())
        own.update(self.named_buffers())
        persistent = self.state_dict(keep_vars=True)
        missing = [name for name in own if name in persistent and name not in full]
        if missing:
            raise KeyError(f"full state dict lacks {missing[:5]}")
        for name, tensor in own.items():
            if name in full:
                tensor.copy_(shard_full(full[name].to(tensor.dtype), spec_of(tensor)))

    def reset_parameters(self) -> None:  # weights come from the single-process build
        pass

    def blocks(self):
        return self.layers.values() if isinstance(self.layers, nn.ModuleDict) else iter(self.layers)

    # pipeline chunks (parallel/pipeline.py)
    def set_input_tensor(self, input_tensor) -> None:
        """megatron's schedules hand the previous stage's output here (a list of one tensor, or None)."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0] if input_tensor else None
        self.input_tensor = input_tensor

    def stage_forward(self, tokens: torch.Tensor, seq_idx: torch.Tensor | None) -> torch.Tensor:
        """This chunk's part of the forward: (seqlen/cp[/tp], batch, d) hidden states to the next stage,
        or, on the last stage, the (seqlen/cp, batch, vocab/tp) vocab-parallel logits; with
        chunks_loss(), the final-normed (seqlen, batch, d) hidden states instead (see stage_loss)."""
        hidden = self._embed(tokens) if self.pre_process else self.input_tensor
        for layer in self.blocks():
            hidden = layer(hidden, seq_idx)
        if not self.post_process:
            return hidden
        hidden = self.norm_f(hidden)
        return hidden if self.chunks_loss() else self._logits(hidden)

    def stage_loss(self, output: torch.Tensor, labels: torch.Tensor, z_loss_coeff: float = 0.0):
        """The last stage's (loss, cross-entropy) from its stage_forward output."""
        if self.chunks_loss():
            return self.chunked_loss(output, labels, z_loss_coeff)
        return self.loss_from_logits(output, labels, z_loss_coeff)

    def local_num_parameters(self) -> dict[str, int]:
        """This chunk's parameters (global counts over tp); a tied head copy counts on the first stage."""
        counts = HybridLM.num_parameters(self)
        if not self.pre_process and hasattr(self, "embeddings"):
            copy = self.cfg.vocab_size * self.cfg.d_model
            counts = {k: v - copy for k, v in counts.items()}
        return counts

    def num_parameters(self) -> dict[str, int]:
        """Whole-model counts (the same at any tp and pp)."""
        if isinstance(self.layers, nn.ModuleDict):
            from parallel.pipeline import global_num_parameters

            return global_num_parameters([self])
        return HybridLM.num_parameters(self)

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = context.local_shard(tokens, dim=1)
        hidden = self.embeddings(tokens)  # (batch, seqlen/cp, d) or, under SP, (seqlen/cp/tp, batch, d)
        if not self.sequence_parallel:
            hidden = hidden.transpose(0, 1).contiguous()
        return hidden

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        from megatron.core import tensor_parallel as mtp

        if self.sequence_parallel:
            hidden = mtp.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)
        elif state.tp_size() > 1:
            hidden = mtp.copy_to_tensor_model_parallel_region(hidden)
        return nn.functional.linear(hidden, self.output_weight())

    def hidden_states(self, tokens: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (batch, seqlen) whole; seq_idx (batch, seqlen) whole -> (seqlen/cp[/tp], batch, d)."""
        hidden = self._embed(tokens)
        for layer in self.blocks():
            hidden = run_block(layer, hidden, seq_idx, self.recompute_kinds)
        return self.norm_f(hidden)

    def vocab_parallel_logits(self, tokens: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """(seqlen/cp, batch, vocab/tp) logits of this rank's vocabulary slice (and sequence shard)."""
        return self._logits(self.hidden_states(tokens, seq_idx))

    def forward(self, tokens: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        return self.vocab_parallel_logits(tokens, seq_idx).transpose(0, 1)

    def loss(self, tokens, labels, seq_idx=None, z_loss_coeff: float = 0.0):
        """(loss to optimise, cross-entropy of the whole micro-batch for logging). Under cp the token
        means divide this shard's sums by the whole sequence's label count, and the loss to optimise
        is cp x that share (megatron DDP averages gradients over dp x cp); the returned cross-entropy
        is summed over cp, i.e. the replica's. MoE balancing losses are not in it: megatron's router
        sends their gradient into the backward pass itself (parallel.moe.set_aux_loss_scale).
        At tp = cp = 1 (data parallelism only, or the megatron engine on one GPU) this rank holds the
        whole vocabulary and sequence: with loss_chunk_tokens > 0 the head and cross-entropy run in
        chunks as in the single-process build (pretrain/chunked_loss.py), without the float32
        (tokens, vocab) logits that megatron's vocab-parallel cross-entropy needs."""
        if self.chunks_loss():
            return self.chunked_loss(self.hidden_states(tokens, seq_idx), labels, z_loss_coeff)
        return self.loss_from_logits(self.vocab_parallel_logits(tokens, seq_idx), labels, z_loss_coeff)

    def chunks_loss(self) -> bool:
        """Whether the loss runs chunked: loss_chunk_tokens > 0 and tp = cp = 1 (the whole vocabulary
        and sequence on this rank)."""
        return self.loss_chunk_tokens > 0 and state.tp_size() == 1 and state.cp_size() == 1

    def chunked_loss(self, hidden: torch.Tensor, labels: torch.Tensor, z_loss_coeff: float = 0.0):
        """loss() from the final-normed (seqlen, batch, d_model) hidden states, with chunks_loss()."""
        return chunked_lm_loss(hidden, self.output_weight(), labels.t(), z_loss_coeff, self.loss_chunk_tokens)

    def loss_from_logits(self, logits: torch.Tensor, labels: torch.Tensor, z_loss_coeff: float = 0.0):
        """loss() from the (seqlen/cp, batch, vocab/tp) vocab-parallel logits and the whole labels."""
        from megatron.core import tensor_parallel as mtp

        cp = state.cp_size()
        logits = logits.float()
        count = (labels != IGNORE_INDEX).sum().clamp(min=1).float()  # whole sequences (labels arrive whole)
        labels = context.local_shard(labels, dim=1).transpose(0, 1).contiguous()
        mask = (labels != IGNORE_INDEX).float()
        z_loss = None
        if z_loss_coeff > 0:
            local_max = logits.detach().amax(dim=-1, keepdim=True)
            global_max = local_max.clone()
            torch.distributed.all_reduce(global_max, op=torch.distributed.ReduceOp.MAX, group=state.tp_group())
            sum_exp = mtp.reduce_from_tensor_model_parallel_region((logits - global_max).exp().sum(-1))
            lse = sum_exp.log() + global_max.squeeze(-1)
            z_loss = z_loss_coeff * (lse.square() * mask).sum() / count
        # megatron's cross-entropy works in place on the logits; labels outside the slice (incl. -100) are masked
        per_token = mtp.vocab_parallel_cross_entropy(logits.clone() if z_loss is not None else logits, labels)
        ce = (per_token * mask).sum() / count
        loss = ce if z_loss is None else ce + z_loss
        ce = ce.detach()
        if cp > 1:
            loss = loss * cp
            ce = ce.clone()
            torch.distributed.all_reduce(ce, group=state.cp_group())
        return loss, ce
