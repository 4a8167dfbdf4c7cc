"""HybridLM: token embedding, one residual sublayer per pattern symbol, final norm, LM head.

Pattern symbols (Megatron-LM / Nemotron-H notation): `M` Mamba-2 mixer, `*` attention, `-` dense
MLP, `E` MoE MLP, `|` pipeline-stage boundary (ignored here). Every sublayer is x + mixer(norm(x))
with RMSNorm. Parameter names mirror Nemotron-H (`layers.{i}.norm`, `layers.{i}.mixer.*`).

Two builds of one model, chosen by whether megatron-core's process groups exist (parallel.state):
- single process: the modules of pretrain/layers on (batch, seqlen, d_model); the reference.
- tensor parallel: the modules of parallel/ (megatron-core parallel linears), vocab-parallel
  embedding, head and cross-entropy; the residual stream is (seqlen[/tp under sequence
  parallelism], batch, d_model). It starts from the very weights the single-process build draws
  from the same seed (built once on CPU and cut into this rank's pieces), at any tp.
Parameter names are identical in both builds.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from pretrain.config import Derived, ModelConfig
from pretrain.chunked_loss import chunked_lm_loss
from pretrain.loss import lm_loss
from pretrain.layers.attention import Attention, block_layout
from pretrain.layers.mamba import Mamba2Mixer
from pretrain.layers.mlp import MLP
from pretrain.layers.moe import MoE
from pretrain.recompute import run_block


def build_mixer(kind: str, cfg: ModelConfig, derived: Derived) -> nn.Module:
    if kind == "mamba":
        return Mamba2Mixer(cfg.d_model, cfg.mamba, norm_eps=cfg.norm_eps)
    if kind == "attention":
        return Attention(cfg.d_model, cfg.attention, derived.attention_head_dim)
    if kind == "mlp":
        return MLP(cfg.d_model, cfg.mlp.d_ff, cfg.mlp.activation, cfg.mlp.bias)
    if kind == "moe":
        return MoE(cfg.d_model, cfg.moe, derived.moe_shared_d_ff)
    raise ValueError(f"unknown layer kind {kind!r}")


def widened(hidden: torch.Tensor) -> torch.Tensor:
    """A bf16/fp16 residual stream (trainer.residual_in_fp32 null or false) as float32 for its RMSNorm: normed
    as a float32 stream is (and torch's fused RMSNorm wants the weight's dtype); others as they are."""
    return hidden.float() if hidden.dtype in (torch.bfloat16, torch.float16) else hidden


class ResidualBlock(nn.Module):
    """x + mixer(norm(x)); input/output (batch, seqlen, d_model)."""

    def __init__(self, kind: str, cfg: ModelConfig, derived: Derived):
        super().__init__()
        self.kind = kind
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mixer = build_mixer(kind, cfg, derived)

    def forward(self, hidden: torch.Tensor, seq_idx: torch.Tensor | None) -> torch.Tensor:
        extra = block_layout(self.kind, seq_idx)  # first: see pretrain/layers/attention.py
        # the sum is taken in the wider dtype and kept in the stream's (HybridLM.residual_dtype)
        return (hidden + self.mixer(self.norm(widened(hidden)), seq_idx, **extra)).to(hidden.dtype)


def _parallel_groups_ready() -> bool:
    try:
        from parallel.state import is_initialized
    except ImportError:  # pragma: no cover
        return False
    return is_initialized()


class HybridLM(nn.Module):
    """tokens (batch, seqlen) int64, seq_idx (batch, seqlen) int32 -> logits (batch, seqlen, vocab
    [/tp: this rank's vocabulary slice in the parallel build]).

    `loss_chunk_tokens` > 0 (set by the engine from trainer.loss_chunk_tokens): `loss` computes the
    head and cross-entropy in chunks of that many tokens (pretrain/chunked_loss.py) instead of
    materialising the logits; the parallel build does too at tp = cp = 1, and otherwise keeps its
    vocab-parallel loss. `residual_dtype` (set by the single-process engine under
    autocast unless trainer.residual_in_fp32=true: the autocast dtype): the residual stream's dtype, else the
    embedding's (float32 weights: float32). `recompute_kinds`
    (set by the engine from trainer.recompute): blocks of these kinds recompute their activations in
    the backward pass (pretrain/recompute.py; both builds)."""

    loss_chunk_tokens: int = 0
    residual_dtype: torch.dtype | None = None  # the residual stream's dtype where not the embedding's (trainer.residual_in_fp32)
    recompute_kinds: frozenset = frozenset()  # block kinds rerun in backward (trainer.recompute, pretrain/recompute.py)

    def __new__(cls, cfg: ModelConfig, derived: Derived, *args, parallel: bool | None = None, **kwargs):
        if cls is HybridLM and (parallel if parallel is not None else _parallel_groups_ready()):
            from parallel.model import ParallelHybridLM

            return super().__new__(ParallelHybridLM)
        return super().__new__(cls)

    def __init__(self, cfg: ModelConfig, derived: Derived, *, parallel: bool | None = None):
        super().__init__()
        self.cfg = cfg
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(ResidualBlock(kind, cfg, derived) for kind in derived.layer_kinds)
        self.norm_f = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) for projections and embeddings; output projections of each residual
        branch scaled by 1/sqrt(2 x layers) (GPT-2 / Megatron); Mamba's own parameters keep their init."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * len(self.layers))
        nn.init.normal_(self.embeddings.weight, std=std)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=std)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_output = name.endswith(("out_proj", "o_proj", "down_proj"))
                nn.init.normal_(module.weight, std=out_std if is_output else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, MoE):
                nn.init.normal_(module.gate.weight, std=std)

    def blocks(self):
        """The residual blocks, in layer order."""
        return iter(self.layers)

    def output_weight(self) -> torch.Tensor:
        return self.embeddings.weight if self.lm_head is None else self.lm_head.weight

    def hidden_states(self, tokens: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.embeddings(tokens)
        if self.residual_dtype is not None:
            hidden = hidden.to(self.residual_dtype)
        for layer in self.layers:
            hidden = run_block(layer, hidden, seq_idx, self.recompute_kinds)
        return self.norm_f(widened(hidden))

    def forward(self, tokens: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        logits = nn.functional.linear(self.hidden_states(tokens, seq_idx), self.output_weight())
        self.take_aux_loss()  # logits only: no MoE may keep this forward's autograd graph alive
        return logits

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor, seq_idx: torch.Tensor | None = None,
             z_loss_coeff: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to optimise incl. the MoE aux loss, cross-entropy for logging) of one micro-batch."""
        hidden = self.hidden_states(tokens, seq_idx)
        if self.loss_chunk_tokens > 0:
            loss, ce = chunked_lm_loss(hidden, self.output_weight(), labels, z_loss_coeff, self.loss_chunk_tokens)
        else:
            loss, ce = lm_loss(nn.functional.linear(hidden, self.output_weight()), labels, z_loss_coeff)
        aux = self.take_aux_loss()
        return (loss if aux is None else loss + aux), ce

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata: dict | None = None) -> dict:
        """megatron-core dist_checkpointing view of every parameter and persistent buffer; keys and
        global shapes independent of tp (see parallel/checkpointing.py for the contract)."""
        from parallel.checkpointing import sharded_state_dict

        return sharded_state_dict(self, prefix)

    def num_parameters(self) -> dict[str, int]:
        """Global parameter counts (the same at any tp): total, and active per token."""
        from parallel.common import spec_of

        def global_numel(p: torch.Tensor) -> int:
            spec = spec_of(p)
            local = sum(part.local_size for part in spec.parts)
            size = sum(part.size for part in spec.parts)
            return p.numel() // max(local, 1) * size if p.ndim else 1

        expert_params = {id(p) for layer in self.moe_layers() for p in layer.experts.parameters()}
        total = sum(global_numel(p) for p in self.parameters() if id(p) not in expert_params)
        inactive = 0
        for layer in self.moe_layers():  # under expert parallelism a rank holds only some experts
            some_expert = next(iter(layer.experts.children()))
            per_expert = sum(global_numel(p) for p in some_expert.parameters())
            total += layer.cfg.num_experts * per_expert
            inactive += (layer.cfg.num_experts - layer.cfg.top_k) * per_expert
        return {"total": total, "active": total - inactive}

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if hasattr(m, "update_expert_bias")]

    def take_aux_loss(self) -> torch.Tensor | None:
        """Sum of the MoE load-balancing losses of the last forward (None without softmax_aux MoE), taken:
        the layers drop theirs. A loss tensor held by a module would keep its forward's whole autograd
        graph (every block's saved activations before that layer) alive after a forward without
        backward, into the next forward."""
        layers = self.moe_layers()
        losses = [m.aux_loss for m in layers if m.aux_loss is not None and m.cfg.router == "softmax_aux"]
        for m in layers:
            m.aux_loss = None
        return torch.stack(losses).sum() if losses else None
