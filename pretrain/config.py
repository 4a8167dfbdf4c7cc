"""The one configuration schema: typed dataclasses, loading, validation and derived values.

A run's config is built from YAML files merged in order and then `key=value` overrides
(omegaconf dotlist syntax) on top of the structured schema below. Unknown keys and wrong types
are rejected by omegaconf; everything that needs more than a type check is checked in
`validate`, which also computes every derived value once (`Derived`) and never writes back
into the config. Every error a user can cause is a `ConfigError` naming the key and the value.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

LAYER_SYMBOLS = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
STAGE_BOUNDARY = "|"


class ConfigError(ValueError):
    """A config problem the user can fix; the message names the key and the value."""


@dataclass
class RunConfig:
    name: str = "demo"
    dir: str = "runs"
    seed: int = 1234


@dataclass
class MambaConfig:
    num_heads: int = 8
    head_dim: int = 64
    num_groups: int = 1
    d_state: int = 128
    d_conv: int = 4
    chunk_size: int = 256
    conv_bias: bool = True
    proj_bias: bool = False
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_limit_min: float = 0.0
    dt_limit_max: float = math.inf
    A_init_min: float = 1.0
    A_init_max: float = 16.0
    norm_before_gate: bool = False


@dataclass
class AttentionConfig:
    num_heads: int = 8
    num_kv_heads: int = 8
    head_dim: Optional[int] = None  # default d_model // num_heads
    rope: bool = False  # Jamba and Nemotron-H use no positional encoding
    rope_theta: float = 10000.0
    bias: bool = False


@dataclass
class MLPConfig:
    d_ff: int = 2048
    activation: str = "relu2"  # relu2 (squared ReLU, non-gated) | swiglu
    bias: bool = False


@dataclass
class MoEConfig:
    num_experts: int = 8
    top_k: int = 2
    d_ff: int = 1024
    activation: str = "relu2"  # relu2 | swiglu
    router: str = "sigmoid_bias"  # sigmoid_bias (expert-bias balancing) | softmax_aux (aux loss)
    aux_loss_coeff: float = 0.01  # softmax_aux only
    bias_update_rate: float = 1e-3  # sigmoid_bias only: step of the expert-bias update
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    num_shared_experts: int = 0  # 0 or 1 shared MLP of width shared_d_ff
    shared_d_ff: Optional[int] = None  # default d_ff
    capacity_factor: Optional[float] = None  # None = dropless; else each expert takes <= ceil(T*k/E*factor) slots


@dataclass
class ModelConfig:
    pattern: str = "M-*-"
    d_model: int = 512
    vocab_size: int = 512
    tie_embeddings: bool = False
    norm_eps: float = 1e-5
    init_std: float = 0.02
    mamba: MambaConfig = field(default_factory=MambaConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    mlp: MLPConfig = field(default_factory=MLPConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)


@dataclass
class StreamConfig:
    """One stream of a mixture (see data/streams.py): a local `path`, or `remote` (s3://, gs://, ...) cached
    in `local`; at most one weight: proportion (relative, all streams or none), repeat or choose."""
    path: str = ""
    remote: str = ""
    local: str = ""
    proportion: Optional[float] = None
    repeat: Optional[float] = None
    choose: Optional[int] = None


@dataclass
class ValidationDataConfig:
    """Held-out data for periodic evaluation (trainer.eval_interval); the same forms as data.path/streams."""
    path: str = ""
    streams: list[StreamConfig] = field(default_factory=list)


@dataclass
class DataConfig:
    path: str = ""  # a directory of MDS shards written by `python -m data.prepare` (the one-stream case)
    streams: list[StreamConfig] = field(default_factory=list)  # a mixture instead of `path`
    demo_corpus: bool = False  # prepare the offline demo corpus into `path` when it is missing
    tokenizer: str = "bytes"  # "bytes" or a tokenizer.json
    seq_len: int = 1024
    micro_batch_size: int = 4
    global_batch_size: int = 4
    num_workers: int = 0
    shuffle: bool = True
    # mosaicml-streaming's canonical node count, which fixes the sample order: null = its default
    # (the node count of the first run; a resume keeps the saved value). Pin it (e.g. 8) for the same
    # order on any node count from the start; it must divide, or be a multiple of, the node count.
    num_canonical_nodes: Optional[int] = None
    validation: ValidationDataConfig = field(default_factory=ValidationDataConfig)


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 100
    wsd_decay_fraction: float = 0.2  # wsd: share of the steps spent in the final decay


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    max_tokens: int = 0  # > 0: train for this many tokens instead of max_steps
    log_interval: int = 10
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    device: str = "auto"  # auto | cpu | cuda
    z_loss_coeff: float = 0.0
    # tokens per chunk of the fused LM head + cross-entropy (pretrain/chunked_loss.py; single-process
    # build): the (tokens, vocab) logits are never materialised. 0 = off; null = auto (4096 on CUDA, off on CPU)
    loss_chunk_tokens: Optional[int] = None
    # activation recomputation (pretrain/recompute.py): none | full | comma-separated block kinds
    # (mamba, attention, mlp, moe) whose activations are recomputed in the backward pass, and parts
    # (mlp_act, mamba_norm, mamba_conv, mamba_states): cheap results per layer recomputed instead of kept
    recompute: str = "none"
    # auto: the single-process build (pretrain/layers, torch AdamW, bf16 autocast over fp32 weights) in
    # one process, the megatron engine (parallel/engine.py) with several; megatron: that engine in one
    # process too (a 1-rank process group; on CUDA bf16 parameters with fp32 main weights)
    engine: str = "auto"
    # torch.compile each residual block, in every build and parallel layout (the Triton kernels are opaque
    # torch.library custom ops: one graph per block, kernels launched by their own launcher)
    compile: bool = False
    # the single-process engine's Linear layers sum their weight gradients into float32 buffers inside
    # the weight-gradient GEMM (pretrain/layers/linear.py) instead of bf16 GEMM + cast + AccumulateGrad,
    # and cast their weights to the autocast dtype once per optimizer step, not per micro-batch.
    # null = on for CUDA when a step accumulates two or more micro-batches (per dp rank), else off;
    # true = on (also on the CPU); false = plain autograd
    gradient_accumulation_fusion: Optional[bool] = None
    # the residual stream's dtype under bf16 autocast (the single-process engine): null or false = the
    # autocast dtype, as Megatron-LM's default (fp32_residual_connection=False) and the megatron
    # engine's bf16 parameters give: half the bytes in every residual add, pre-norm and their
    # gradients, and in the activations the pre-norms keep (each sum still taken in float32, then
    # rounded once); true = float32 (each block's output added to a float32 stream, as mamba_ssm's
    # residual_in_fp32). false is the default since bench/NOTES_train.md Run 24 (its loss within bf16
    # noise of the float32 stream's reference over three seeds); null, which configs and checkpoints
    # written before then hold (it meant float32 there), still loads and means false
    residual_in_fp32: Optional[bool] = False
    # true: the same bits run to run on the same machines and layout, at some speed: torch's
    # deterministic algorithms (an op that has none raises at its first call, naming itself),
    # cuBLAS's fixed workspace, no cuDNN autotuning, Inductor's deterministic mode where this torch
    # has it, and kernels.deterministic's fixed Triton configs (pretrain/trainer.configure_kernels)
    deterministic: bool = False
    eval_interval: int = 0  # > 0: evaluate on data.validation every this many steps (and at the end)
    eval_steps: int = 10  # micro-batches per dp rank in one evaluation


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    cp: int = 1
    sequence_parallel: bool = False
    virtual_pp: Optional[int] = None


@dataclass
class CheckpointConfig:
    interval: int = 0  # steps between saves; 0 = only at the end and on signals
    interval_minutes: float = 0.0  # > 0: also save when this much wall time has passed
    resume: str = "auto"  # auto | none | a checkpoint path
    keep_last: int = 3
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this (0 = off)
    async_save: bool = True
    # signals that ask for a checkpoint at the next step boundary, then exit 42 (requeue me)
    signals: list[str] = field(default_factory=lambda: ["SIGUSR1", "SIGTERM"])
    verify_on_load: bool = True  # check the checksums of a checkpoint before resuming from it
    async_timeout_minutes: float = 30.0  # a background save still running after this is killed and reported


@dataclass
class KernelsConfig:
    backend: str = "triton"  # triton | torch (triton falls back to torch where it cannot run)
    # true: fixed launch configs instead of autotuning (same bits on every node and run, no tuning
    # at start-up; kernels/backend.set_deterministic). torch's own ops are not affected.
    deterministic: bool = False


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)


# ---------------------------------------------------------------------------------------------
# loading


def _explain(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    msg = str(err).splitlines()[0]
    if type(err).__name__ in ("ConfigKeyError", "ConfigAttributeError") or " not in " in msg:
        return ConfigError(f"unknown config key '{key}' (in {source})")
    return ConfigError(f"bad value for config key '{key}' (in {source}): {msg}")


def load_config(config_files: list[str] | tuple[str, ...] = (), overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Schema <- each YAML file in order <- dotlist overrides; returns a typed `Config` object."""
    merged = OmegaConf.structured(Config)
    for path in config_files:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        except OmegaConfBaseException as err:
            raise _explain(err, path) from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            if isinstance(OmegaConf.select(merged, key, default=None), str):
                # string keys take the text as is: patterns like `*-M` are not YAML aliases or lists
                OmegaConf.update(merged, key, raw.strip("'\""), merge=False)
            else:
                merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise _explain(err, f"override '{item}'") from None
    try:
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise _explain(err, "the merged config") from None


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml_text(text: str) -> Config:
    merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(text))
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def as_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# validation and derived values


@dataclass(frozen=True)
class Derived:
    """Values computed from the config once; never written back into it."""

    world_size: int
    dp: int
    grad_accum_steps: int
    layer_kinds: tuple[str, ...]  # one of LAYER_SYMBOLS' values per residual sublayer
    stage_layer_counts: tuple[int, ...]  # layers per `|`-separated segment of the pattern
    mamba_d_inner: int
    mamba_conv_dim: int  # channels of the conv: x, B and C
    attention_head_dim: int
    moe_shared_d_ff: int
    tokens_per_step: int
    total_steps: int
    run_dir: str
    checkpoint_dir: str


def _need(cond: bool, key: str, value, why: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r}: {why}")


def stream_dicts(path: str, streams: list) -> list[dict] | None:
    """data.streams (or data.validation.streams) as plain dicts for data.dataset, None when `path` is used."""
    if not streams:
        return None
    return [OmegaConf.to_container(OmegaConf.structured(s)) if not isinstance(s, dict) else dict(s) for s in streams]


def _check_streams(path: str, streams: list, key: str) -> None:
    """The stream rules of data/streams.py as ConfigErrors naming the key (no file system access here)."""
    from data.streams import stream_specs

    if not path and not streams:
        raise ConfigError(f"{key}.path='': must name a prepared dataset directory (python -m data.prepare), "
                          f"or give {key}.streams")
    try:
        stream_specs(path or None, stream_dicts(path, streams), key=key)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def validate(cfg: Config, world_size: int = 1) -> Derived:
    """Check every cross-field rule and compute the derived values; raises ConfigError."""
    m, p, d = cfg.model, cfg.parallel, cfg.data
    for key in ("tp", "pp", "ep", "cp"):
        _need(getattr(p, key) >= 1, f"parallel.{key}", getattr(p, key), "must be >= 1")
    model_parallel = p.tp * p.pp * p.cp
    _need(world_size % model_parallel == 0, "parallel", f"tp={p.tp} pp={p.pp} cp={p.cp}",
          f"world size {world_size} is not divisible by tp*pp*cp={model_parallel}")
    dp = world_size // model_parallel
    _need((dp * p.cp) % p.ep == 0, "parallel.ep", p.ep,
          f"must divide dp*cp={dp * p.cp} (world size {world_size} / tp*pp*cp={model_parallel})")
    # experts split over tp and ep: megatron's dispatcher all-gathers sequence shards over tp
    _need(p.ep == 1 or p.tp == 1 or p.sequence_parallel, "parallel.sequence_parallel", p.sequence_parallel,
          f"must be true when parallel.ep={p.ep} and parallel.tp={p.tp} are both > 1")

    unknown = sorted({c for c in m.pattern if c not in LAYER_SYMBOLS and c != STAGE_BOUNDARY})
    _need(not unknown, "model.pattern", m.pattern,
          f"unknown symbol(s) {''.join(unknown)!r}; use M (Mamba-2), * (attention), - (MLP), E (MoE), | (stage boundary)")
    kinds = tuple(LAYER_SYMBOLS[c] for c in m.pattern if c != STAGE_BOUNDARY)
    _need(len(kinds) > 0, "model.pattern", m.pattern, "has no layers")
    segments = m.pattern.split(STAGE_BOUNDARY)
    _need(all(segments), "model.pattern", m.pattern, "has an empty pipeline stage (two '|' in a row or at an end)")
    stage_counts = tuple(len(s) for s in segments)
    _need(m.d_model > 0, "model.d_model", m.d_model, "must be > 0")
    _need(m.vocab_size > 0, "model.vocab_size", m.vocab_size, "must be > 0")
    _need(m.vocab_size % p.tp == 0, "model.vocab_size", m.vocab_size, f"must be divisible by parallel.tp={p.tp}")

    mb = m.mamba
    d_inner = mb.num_heads * mb.head_dim
    if "mamba" in kinds:
        _need(mb.num_heads > 0 and mb.head_dim > 0, "model.mamba.num_heads", mb.num_heads, "heads and head_dim must be > 0")
        _need(mb.num_groups > 0 and mb.num_heads % mb.num_groups == 0, "model.mamba.num_groups", mb.num_groups,
              f"must divide model.mamba.num_heads={mb.num_heads}")
        _need(mb.num_heads % p.tp == 0, "model.mamba.num_heads", mb.num_heads, f"must be divisible by parallel.tp={p.tp}")
        _need(mb.num_groups % p.tp == 0 or p.tp % mb.num_groups == 0, "model.mamba.num_groups", mb.num_groups,
              f"must divide or be a multiple of parallel.tp={p.tp}")
        _need(2 <= mb.d_conv <= 4, "model.mamba.d_conv", mb.d_conv, "must be 2, 3 or 4")
        _need(mb.chunk_size > 0, "model.mamba.chunk_size", mb.chunk_size, "must be > 0")
        _need(0 < mb.dt_min <= mb.dt_max, "model.mamba.dt_min", mb.dt_min, f"must be in (0, dt_max={mb.dt_max}]")
        _need(0 <= mb.dt_limit_min < mb.dt_limit_max, "model.mamba.dt_limit_min", mb.dt_limit_min,
              f"must be >= 0 and < dt_limit_max={mb.dt_limit_max}")
        _need(0 < mb.A_init_min <= mb.A_init_max, "model.mamba.A_init_min", mb.A_init_min,
              f"must be in (0, A_init_max={mb.A_init_max}]")
        _need(p.cp == 1 or mb.num_heads % (p.tp * p.cp) == 0, "model.mamba.num_heads", mb.num_heads,
              f"must be divisible by tp*cp={p.tp * p.cp} for context parallelism")
        _need(mb.num_groups % (p.tp * p.cp) == 0 or (p.tp * p.cp) % mb.num_groups == 0, "model.mamba.num_groups",
              mb.num_groups, f"must divide or be a multiple of tp*cp={p.tp * p.cp} for context parallelism")

    at = m.attention
    head_dim = at.head_dim if at.head_dim is not None else (m.d_model // at.num_heads if at.num_heads > 0 else 0)
    if "attention" in kinds:
        _need(at.num_heads > 0, "model.attention.num_heads", at.num_heads, "must be > 0")
        _need(at.head_dim is not None or m.d_model % at.num_heads == 0, "model.attention.num_heads", at.num_heads,
              f"must divide model.d_model={m.d_model} (or set model.attention.head_dim)")
        _need(at.num_kv_heads > 0 and at.num_heads % at.num_kv_heads == 0, "model.attention.num_kv_heads",
              at.num_kv_heads, f"must divide model.attention.num_heads={at.num_heads}")
        _need(at.num_heads % p.tp == 0, "model.attention.num_heads", at.num_heads,
              f"must be divisible by parallel.tp={p.tp}")
        _need(at.num_kv_heads % p.tp == 0 or p.tp % at.num_kv_heads == 0, "model.attention.num_kv_heads",
              at.num_kv_heads, f"must divide or be a multiple of parallel.tp={p.tp}")
        _need(p.cp == 1 or at.num_heads % (p.tp * p.cp) == 0, "model.attention.num_heads", at.num_heads,
              f"must be divisible by tp*cp={p.tp * p.cp} for context parallelism")
        _need(at.num_kv_heads % (p.tp * p.cp) == 0 or (p.tp * p.cp) % at.num_kv_heads == 0,
              "model.attention.num_kv_heads", at.num_kv_heads,
              f"must divide or be a multiple of tp*cp={p.tp * p.cp} for context parallelism")
        _need(not at.rope or head_dim % 2 == 0, "model.attention.head_dim", head_dim, "must be even for RoPE")

    if "mlp" in kinds:
        _need(m.mlp.activation in ("relu2", "swiglu"), "model.mlp.activation", m.mlp.activation, "must be relu2 or swiglu")
        _need(m.mlp.d_ff > 0 and m.mlp.d_ff % p.tp == 0, "model.mlp.d_ff", m.mlp.d_ff,
              f"must be > 0 and divisible by parallel.tp={p.tp}")

    moe = m.moe
    shared_d_ff = moe.shared_d_ff if moe.shared_d_ff is not None else moe.d_ff
    if "moe" in kinds:
        _need(moe.activation in ("relu2", "swiglu"), "model.moe.activation", moe.activation, "must be relu2 or swiglu")
        _need(moe.router in ("sigmoid_bias", "softmax_aux"), "model.moe.router", moe.router,
              "must be sigmoid_bias or softmax_aux")
        _need(moe.num_experts > 0, "model.moe.num_experts", moe.num_experts, "must be > 0")
        _need(0 < moe.top_k <= moe.num_experts, "model.moe.top_k", moe.top_k,
              f"must be in [1, model.moe.num_experts={moe.num_experts}]")
        _need(moe.num_experts % p.ep == 0, "model.moe.num_experts", moe.num_experts,
              f"must be divisible by parallel.ep={p.ep}")
        # megatron-core's TopKRouter (the multi-GPU build) always normalises sigmoid scores over the top k
        _need(moe.norm_topk_prob or moe.router != "sigmoid_bias" or moe.top_k == 1, "model.moe.norm_topk_prob",
              moe.norm_topk_prob, "must be true with model.moe.router=sigmoid_bias and top_k > 1 "
              "(megatron-core's TopKRouter normalises sigmoid gate weights over the chosen experts)")
        _need(moe.capacity_factor is None or moe.capacity_factor > 0, "model.moe.capacity_factor",
              moe.capacity_factor, "must be > 0 (or null for dropless routing)")
        _need(moe.num_shared_experts in (0, 1), "model.moe.num_shared_experts", moe.num_shared_experts, "must be 0 or 1")
        _need(moe.d_ff > 0 and moe.d_ff % p.tp == 0, "model.moe.d_ff", moe.d_ff,
              f"must be > 0 and divisible by parallel.tp={p.tp}")

    _need(p.virtual_pp is None or p.virtual_pp >= 1, "parallel.virtual_pp", p.virtual_pp, "must be >= 1 (or unset)")
    _need(p.virtual_pp in (None, 1) or p.pp > 1, "parallel.virtual_pp", p.virtual_pp, "needs parallel.pp > 1")
    if p.pp > 1:
        stages = p.pp * (p.virtual_pp or 1)
        what = f"parallel.pp={p.pp}" + (f" x parallel.virtual_pp={p.virtual_pp}" if p.virtual_pp else "")
        if len(segments) > 1:
            _need(len(segments) % stages == 0, "model.pattern", m.pattern,
                  f"has {len(segments)} '|'-separated stages, not a multiple of {what}={stages}")
        else:
            _need(len(kinds) % stages == 0, "model.pattern", m.pattern,
                  f"{len(kinds)} layers cannot be split evenly into {what}={stages} stages; add '|' boundaries")

    _need(d.seq_len > 0, "data.seq_len", d.seq_len, "must be > 0")
    _need(d.seq_len % (p.cp * (p.tp if p.sequence_parallel else 1)) == 0, "data.seq_len", d.seq_len,
          "must be divisible by cp (x tp with sequence parallelism)")
    _need(d.micro_batch_size > 0, "data.micro_batch_size", d.micro_batch_size, "must be > 0")
    _need(d.num_canonical_nodes is None or d.num_canonical_nodes > 0, "data.num_canonical_nodes",
          d.num_canonical_nodes, "must be null or > 0")
    per_step = d.micro_batch_size * dp
    _need(d.global_batch_size > 0 and d.global_batch_size % per_step == 0, "data.global_batch_size",
          d.global_batch_size, f"must be a multiple of data.micro_batch_size x dp = {d.micro_batch_size} x {dp}")
    if p.pp > 1 and (p.virtual_pp or 1) > 1:  # megatron's interleaved schedule runs micro-batches in groups of pp
        accum = d.global_batch_size // per_step
        _need(accum % p.pp == 0, "data.global_batch_size", d.global_batch_size,
              f"gives {accum} micro-batches per step; the interleaved schedule (parallel.virtual_pp="
              f"{p.virtual_pp}) needs a multiple of parallel.pp={p.pp}")
    _check_streams(d.path, d.streams, "data")
    if d.validation.path or d.validation.streams:
        _check_streams(d.validation.path, d.validation.streams, "data.validation")

    o = cfg.optim
    _need(o.schedule in ("cosine", "wsd", "constant"), "optim.schedule", o.schedule, "must be cosine, wsd or constant")
    _need(o.lr > 0, "optim.lr", o.lr, "must be > 0")
    _need(0 <= o.min_lr <= o.lr, "optim.min_lr", o.min_lr, f"must be in [0, optim.lr={o.lr}]")
    _need(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "must be >= 0")
    _need(0 <= o.wsd_decay_fraction <= 1, "optim.wsd_decay_fraction", o.wsd_decay_fraction, "must be in [0, 1]")

    t = cfg.trainer
    _need(t.precision in ("auto", "bf16", "fp32"), "trainer.precision", t.precision, "must be auto, bf16 or fp32")
    _need(t.device in ("auto", "cpu", "cuda"), "trainer.device", t.device, "must be auto, cpu or cuda")
    _need(t.engine in ("auto", "megatron"), "trainer.engine", t.engine, "must be auto or megatron")
    single_process_engine = world_size == 1 and t.engine != "megatron"  # the one with autocast over fp32 weights
    _need(not t.gradient_accumulation_fusion or single_process_engine,
          "trainer.gradient_accumulation_fusion", t.gradient_accumulation_fusion,
          "applies to the single-process engine only (one process, trainer.engine=auto); the megatron engine "
          "sums bf16 gradients into its own float32 buffers: use null or false")
    _need(not t.residual_in_fp32 or single_process_engine,
          "trainer.residual_in_fp32", t.residual_in_fp32,
          "applies to the single-process engine only (one process, trainer.engine=auto); the megatron engine's "
          "residual stream is in its parameters' dtype (bf16 on CUDA): use null or false")
    from pretrain.recompute import parse_policy

    try:
        parse_policy(t.recompute)
    except ValueError as err:
        raise ConfigError(f"trainer.recompute={t.recompute!r}: {err}") from None
    _need(t.loss_chunk_tokens is None or t.loss_chunk_tokens >= 0, "trainer.loss_chunk_tokens", t.loss_chunk_tokens,
          "must be >= 0 (0 = off) or null (auto: on for CUDA only)")
    _need(t.log_interval > 0, "trainer.log_interval", t.log_interval, "must be > 0")
    _need(t.eval_interval >= 0, "trainer.eval_interval", t.eval_interval, "must be >= 0 (0 = no evaluation)")
    _need(t.eval_steps > 0, "trainer.eval_steps", t.eval_steps, "must be > 0")
    _need(t.eval_interval == 0 or bool(d.validation.path or d.validation.streams), "trainer.eval_interval",
          t.eval_interval, "needs validation data: set data.validation.path or data.validation.streams")
    tokens_per_step = d.global_batch_size * d.seq_len
    if t.max_tokens > 0:
        total_steps = math.ceil(t.max_tokens / tokens_per_step)
    else:
        _need(t.max_steps > 0, "trainer.max_steps", t.max_steps, "must be > 0 (or set trainer.max_tokens)")
        total_steps = t.max_steps

    k = cfg.kernels
    _need(k.backend in ("triton", "torch"), "kernels.backend", k.backend, "must be triton or torch")
    c = cfg.checkpoint
    _need(c.interval >= 0, "checkpoint.interval", c.interval, "must be >= 0")
    _need(c.keep_last >= 1, "checkpoint.keep_last", c.keep_last, "must be >= 1")
    _need(c.keep_every >= 0, "checkpoint.keep_every", c.keep_every, "must be >= 0")
    _need(c.interval_minutes >= 0, "checkpoint.interval_minutes", c.interval_minutes, "must be >= 0")
    _need(bool(c.resume), "checkpoint.resume", c.resume, "must be auto, none or a checkpoint path")
    import signal as _signal

    bad_signals = [s for s in c.signals if not isinstance(getattr(_signal, str(s).upper(), None), _signal.Signals)
                   or str(s).upper() in ("SIGKILL", "SIGSTOP")]
    _need(not bad_signals, "checkpoint.signals", list(c.signals),
          f"unknown or uncatchable signal name(s) {bad_signals}; use names like SIGUSR1, SIGTERM")
    _need(bool(cfg.run.name) and "/" not in cfg.run.name, "run.name", cfg.run.name, "must be a non-empty name without '/'")

    run_dir = os.path.join(cfg.run.dir, cfg.run.name)
    return Derived(
        world_size=world_size,
        dp=dp,
        grad_accum_steps=d.global_batch_size // per_step,
        layer_kinds=kinds,
        stage_layer_counts=stage_counts,
        mamba_d_inner=d_inner,
        mamba_conv_dim=d_inner + 2 * mb.num_groups * mb.d_state,
        attention_head_dim=head_dim,
        moe_shared_d_ff=shared_d_ff,
        tokens_per_step=tokens_per_step,
        total_steps=total_steps,
        run_dir=run_dir,
        checkpoint_dir=os.path.join(run_dir, "checkpoints"),
    )
