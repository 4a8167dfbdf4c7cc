"""HybridLM <-> Hugging Face NemotronH: config fields, weight names, and what cannot be expressed.

Verified against transformers 5.24's `models/nemotron_h` (configuration and modeling code). The
weights are written in the layout of NVIDIA's published Nemotron-H checkpoints (`backbone.*`, one
tensor per expert), which transformers 5 converts on load (`backbone.` -> `model.`, experts merged
into 3-D tensors by its conversion mapping) and which vLLM and the transformers 4 remote code read too.

Weight names, ours -> theirs (every sublayer is `layers.{i}.norm` + `layers.{i}.mixer`):
    embeddings.weight                      backbone.embeddings.weight
    layers.{i}.norm.weight                 backbone.layers.{i}.norm.weight
    M  mixer.in_proj.{weight,bias}         ...mixer.in_proj.*   (z, x, B, C, dt packed the same way)
       mixer.conv_weight (conv_dim, w)     ...mixer.conv1d.weight (conv_dim, 1, w)
       mixer.conv_bias                     ...mixer.conv1d.bias
       mixer.dt_bias, A_log, D             ...mixer.dt_bias, A_log, D
       mixer.norm_weight                   ...mixer.norm.weight
       mixer.out_proj.{weight,bias}        ...mixer.out_proj.*
    *  mixer.{q,k,v,o}_proj.weight         ...mixer.{q,k,v,o}_proj.weight
    -  mixer.{up,down}_proj.{weight,bias}  ...mixer.{up,down}_proj.*
    E  mixer.gate.weight                   ...mixer.gate.weight                    (float32 always)
       mixer.gate.expert_bias              ...mixer.gate.e_score_correction_bias   (float32 always)
       mixer.experts.{j}.{up,down}_proj.weight         the same names
       mixer.shared_experts.{up,down}_proj.weight      the same names; without a shared expert
                                                       an all-zero one of width 1 (exact: relu2(0)=0)
    norm_f.weight                          backbone.norm_f.weight
    lm_head.weight                         lm_head.weight (written even when tied: see below)

Semantics checked against transformers 5.24 (same unless said; tests/export compares logits):
- block: x + mixer(rmsnorm(x)); one eps, layer_norm_epsilon, for the block norms, norm_f and the
  mixer's gated norm: our model.norm_eps. No RoPE anywhere.
- Mamba-2: dt = softplus(dt + dt_bias), then clamped; A = -exp(A_log); y = scan + D * x (x after
  the conv); gated norm rmsnorm_group(y * silu(z)) * weight, group size d_inner / n_groups (= our
  norm_before_gate=False); conv weight[:, -1] multiplies the current token; heads read B/C group
  h // (heads / groups).
  MISMATCH 1 (dt clamp): transformers 5 clamps dt to (time_step_min, inf) and ignores
  time_step_limit; its one-token decode step (generate) does not clamp at all. So time_step_min is
  written as our dt_limit_min (the clamp, 0 by default; our init-only dt_min stays in
  `hybrid_pretrain`), time_step_limit as [dt_limit_min, dt_limit_max], and dt_limit_max must be
  inf. With dt_limit_min > 0, generate() in transformers departs slightly from its own forward.
  Import takes time_step_min as dt_limit_min, i.e. as transformers 5 runs the model.
  MISMATCH 2 (Mamba bias): in/out_proj bias follows `use_bias`, not `mamba_proj_bias` (both written).
- attention: q/k/v/o without bias (hard-coded; attention_bias is not read), scale head_dim**-0.5, GQA.
- MLP and experts: down(act(up(x))), one activation (mlp_hidden_act) for MLPs, routed and shared
  experts: relu2; no gated variant. mlp_bias gives the MLPs and the shared expert biases, never
  the routed experts.
- router: sigmoid(x W^T) in float32 (gate.weight and the bias are kept float32 by transformers, and
  written so); top-k of scores + e_score_correction_bias; weights = the chosen raw scores,
  normalised when norm_topk_prob, times routed_scaling_factor.
  MISMATCH 3 (top-1): transformers normalises even for top_k = 1, we do not: written as
  norm_topk_prob = ours and top_k > 1. Its group-limited routing (n_group = topk_group = 1 here) still
  takes a top-2 inside the group, so at least 2 experts are needed.
  MISMATCH 4 (shared expert): transformers 5 always builds one (n_shared_experts is not read);
  without ours an all-zero expert of width 1 is written (exact), and n_shared_experts = 0.
  MISMATCH 5 (tied head): NemotronHForCausalLM 5.24 declares no tied weights, so lm_head.weight is
  always written (a copy when tie_word_embeddings).
- residual_in_fp32, rescale_prenorm_residual, expand, attention_bias are not read by the forward.
- our pattern's pipeline-stage boundaries `|` have no place in NemotronH; `hybrid_pretrain` keeps
  our whole model config so that --to-checkpoint restores it exactly.
"""
from __future__ import annotations

import math
from dataclasses import asdict
from typing import Callable, Iterator

import torch

from pretrain.config import LAYER_SYMBOLS, STAGE_BOUNDARY, ModelConfig

HF_LAYER_TYPES = {"mamba": "linear_attention", "attention": "full_attention", "mlp": "mlp", "moe": "moe"}
KIND_OF_HF_TYPE = {v: k for k, v in HF_LAYER_TYPES.items()}
# transformers' legacy names of the layer types in `layers_block_type` (before 5.x)
LEGACY_HF_TYPES = {"mamba": "mamba", "attention": "attention", "mlp": "mlp", "moe": "moe"}
SYMBOL_OF_KIND = {v: k for k, v in LAYER_SYMBOLS.items()}
FP32_SUFFIXES = ("mixer.gate.weight", "mixer.gate.e_score_correction_bias")
INF = float("inf")


class IncompatibleConfig(ValueError):
    """The config uses something NemotronH cannot express; the message lists each field."""


def layer_kinds(pattern: str) -> list[str]:
    return [LAYER_SYMBOLS[c] for c in pattern if c != STAGE_BOUNDARY]


# ---------------------------------------------------------------------------------------------
# compatibility


def incompatibilities(cfg: ModelConfig) -> list[str]:
    """One line per field NemotronH cannot express: 'key=value: why; key=X exports'."""
    kinds = set(layer_kinds(cfg.pattern))
    problems: list[str] = []

    def need(ok: bool, key: str, value, why: str, fix: str) -> None:
        if not ok:
            problems.append(f"model.{key}={value!r}: {why}; {fix} would export")

    if "mamba" in kinds:
        mb = cfg.mamba
        need(not mb.norm_before_gate, "mamba.norm_before_gate", mb.norm_before_gate,
             "NemotronH gates before its grouped RMSNorm (norm(y * silu(z)))", "model.mamba.norm_before_gate=false")
        need(math.isinf(mb.dt_limit_max), "mamba.dt_limit_max", mb.dt_limit_max,
             "transformers' NemotronH clamps dt to (time_step_min, inf) and has no upper limit",
             "model.mamba.dt_limit_max=inf")
    if "attention" in kinds:
        at = cfg.attention
        need(not at.rope, "attention.rope", at.rope, "NemotronH attention has no positional encoding",
             "model.attention.rope=false")
        need(not at.bias, "attention.bias", at.bias, "NemotronH attention projections have no bias",
             "model.attention.bias=false")
    if "mlp" in kinds:
        need(cfg.mlp.activation == "relu2", "mlp.activation", cfg.mlp.activation,
             "NemotronH MLPs are non-gated (down(act(up(x))))", "model.mlp.activation=relu2")
    if "moe" in kinds:
        moe = cfg.moe
        need(moe.activation == "relu2", "moe.activation", moe.activation,
             "NemotronH experts are non-gated, with the MLPs' one activation (relu2)", "model.moe.activation=relu2")
        need(moe.router == "sigmoid_bias", "moe.router", moe.router,
             "NemotronH routes with sigmoid scores and a score-correction bias", "model.moe.router=sigmoid_bias")
        need(moe.num_experts >= 2, "moe.num_experts", moe.num_experts,
             "NemotronH's router takes a top-2 inside its expert group", "model.moe.num_experts>=2")
        need(not (cfg.mlp.bias and moe.num_shared_experts), "mlp.bias", cfg.mlp.bias,
             "NemotronH's mlp_bias also gives the shared expert biases, which ours has not",
             "model.mlp.bias=false")
    return problems


def check_exportable(cfg: ModelConfig) -> None:
    problems = incompatibilities(cfg)
    if problems:
        raise IncompatibleConfig(
            "this model cannot be exported to Hugging Face NemotronH without changing it:\n  - "
            + "\n  - ".join(problems))


# ---------------------------------------------------------------------------------------------
# config


def hf_config(cfg: ModelConfig, *, attention_head_dim: int, shared_d_ff: int, dtype: str,
              eos_token_id: int | None, bos_token_id: int | None, pad_token_id: int | None,
              max_position_embeddings: int) -> dict:
    """config.json for transformers' NemotronH (every field it reads), plus our model config under
    `hybrid_pretrain` so that an import restores the fields NemotronH has no place for."""
    check_exportable(cfg)
    kinds = layer_kinds(cfg.pattern)
    mb, at, moe = cfg.mamba, cfg.attention, cfg.moe
    d_inner = mb.num_heads * mb.head_dim
    return {
        "architectures": ["NemotronHForCausalLM"],
        "model_type": "nemotron_h",
        "dtype": dtype,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": len(kinds),
        "layers_block_type": [HF_LAYER_TYPES[k] for k in kinds],
        "hybrid_override_pattern": "".join(SYMBOL_OF_KIND[k] for k in kinds),
        "tie_word_embeddings": cfg.tie_embeddings,
        "layer_norm_epsilon": cfg.norm_eps,
        "initializer_range": cfg.init_std,
        "residual_in_fp32": False,
        "rescale_prenorm_residual": True,
        "use_cache": True,
        "num_logits_to_keep": 1,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "max_position_embeddings": max_position_embeddings,
        # Mamba-2
        "mamba_num_heads": mb.num_heads,
        "mamba_head_dim": mb.head_dim,
        "n_groups": mb.num_groups,
        "ssm_state_size": mb.d_state,
        "conv_kernel": mb.d_conv,
        "chunk_size": mb.chunk_size,
        "expand": max(1, d_inner // cfg.d_model),  # not read: the width is mamba_num_heads * mamba_head_dim
        "mamba_hidden_act": "silu",
        "use_conv_bias": mb.conv_bias,
        "use_bias": mb.proj_bias,
        "mamba_proj_bias": mb.proj_bias,
        "time_step_min": mb.dt_limit_min,  # transformers 5 clamps dt at time_step_min (mismatch 1)
        "time_step_max": mb.dt_max,
        "time_step_floor": mb.dt_init_floor,
        "time_step_limit": [mb.dt_limit_min, mb.dt_limit_max],
        "mamba_ssm_cache_dtype": "float32",
        # attention
        "num_attention_heads": at.num_heads,
        "num_key_value_heads": at.num_kv_heads,
        "head_dim": attention_head_dim,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "sliding_window": None,
        # MLP
        "intermediate_size": cfg.mlp.d_ff,
        "mlp_hidden_act": "relu2",
        "mlp_bias": cfg.mlp.bias,
        "hidden_dropout": 0.0,
        # MoE
        "n_routed_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "moe_intermediate_size": moe.d_ff,
        "n_shared_experts": moe.num_shared_experts,
        "moe_shared_expert_intermediate_size": shared_d_ff if moe.num_shared_experts else 1,
        "moe_latent_size": None,
        "routed_scaling_factor": moe.routed_scaling_factor,
        "norm_topk_prob": bool(moe.norm_topk_prob and moe.top_k > 1),  # mismatch 3
        "n_group": 1,
        "topk_group": 1,
        "num_nextn_predict_layers": 0,
        "hybrid_pretrain": {"model": asdict(cfg)},
    }


def model_config_from_hf(hf: dict) -> tuple[ModelConfig, list[str]]:
    """Our ModelConfig for a NemotronH config.json (ours or anyone's) and notes on what was assumed.

    Raises IncompatibleConfig listing each field our model cannot express."""
    from pretrain.config import AttentionConfig, MambaConfig, MLPConfig, MoEConfig

    notes: list[str] = []
    base = (hf.get("hybrid_pretrain") or {}).get("model")
    cfg = _model_config_from_dict(base) if base else ModelConfig()
    problems = []

    def bad(key: str, why: str) -> None:
        problems.append(f"{key}={hf.get(key)!r}: {why}")

    types = hf.get("layers_block_type") or hf.get("layer_types")
    if types:
        legacy = {v: k for k, v in LEGACY_HF_TYPES.items()}
        kinds = [KIND_OF_HF_TYPE.get(t) or legacy.get(t) for t in types]
        if None in kinds:
            bad("layers_block_type", "unknown layer types")
            kinds = [k for k in kinds if k]
        pattern = "".join(SYMBOL_OF_KIND[k] for k in kinds)
    else:
        pattern = hf.get("hybrid_override_pattern", "")
    if base and base["pattern"].replace(STAGE_BOUNDARY, "") == pattern:
        pattern = base["pattern"]  # keep our pipeline-stage boundaries
    if hf.get("mamba_hidden_act", "silu") not in ("silu", "swish"):
        bad("mamba_hidden_act", "our Mamba-2 mixer uses silu")
    if hf.get("mlp_hidden_act", "relu2") != "relu2":
        bad("mlp_hidden_act", "our non-gated MLPs and experts use relu2")
    if hf.get("moe_latent_size") is not None:
        bad("moe_latent_size", "our MoE has no latent projection")
    if hf.get("n_group", 1) != 1 or hf.get("topk_group", 1) != 1:
        bad("n_group", "our router has no group-limited routing (n_group = topk_group = 1 imports)")
    if hf.get("num_nextn_predict_layers", 0):
        notes.append(f"num_nextn_predict_layers={hf['num_nextn_predict_layers']}: the multi-token "
                     "prediction layers (mtp.*) are not imported")
    if problems:
        raise IncompatibleConfig("this NemotronH config cannot be imported:\n  - " + "\n  - ".join(problems))

    limit = hf.get("time_step_limit") or [0.0, INF]
    step_min = float(hf.get("time_step_min", 0.001))
    if float(limit[0]) != step_min and not base:
        notes.append(f"time_step_min={step_min} but time_step_limit={list(limit)}: transformers 5 clamps dt at "
                     f"time_step_min; imported with dt_limit=({step_min}, {float(limit[1])}) as transformers 5 runs it")
    mb = MambaConfig(**{**asdict(cfg.mamba), **dict(
        num_heads=hf["mamba_num_heads"], head_dim=hf["mamba_head_dim"], num_groups=hf["n_groups"],
        d_state=hf["ssm_state_size"], d_conv=hf["conv_kernel"], chunk_size=hf.get("chunk_size", 128),
        conv_bias=hf.get("use_conv_bias", True), proj_bias=hf.get("use_bias", False),
        dt_limit_min=step_min, dt_limit_max=INF, norm_before_gate=False)})
    if not base:
        mb.dt_min = step_min if step_min > 0 else mb.dt_min
        mb.dt_max = hf.get("time_step_max", mb.dt_max)
        mb.dt_init_floor = hf.get("time_step_floor", mb.dt_init_floor)
    at = AttentionConfig(**{**asdict(cfg.attention), **dict(
        num_heads=hf["num_attention_heads"], num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf.get("attention_head_dim"), rope=False, bias=False)})
    mlp = MLPConfig(**{**asdict(cfg.mlp), **dict(d_ff=hf["intermediate_size"], activation="relu2",
                                                 bias=hf.get("mlp_bias", False))})
    top_k = hf.get("num_experts_per_tok", 2)
    shared = 1 if hf.get("n_shared_experts", 1) else 0
    moe = MoEConfig(**{**asdict(cfg.moe), **dict(
        num_experts=hf.get("n_routed_experts", 8), top_k=top_k, d_ff=hf.get("moe_intermediate_size", 1024),
        activation="relu2", router="sigmoid_bias", routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        num_shared_experts=shared,
        shared_d_ff=hf.get("moe_shared_expert_intermediate_size") if shared else (cfg.moe.shared_d_ff if base else None))})
    if base and cfg.moe.shared_d_ff is None and moe.shared_d_ff == moe.d_ff:
        moe.shared_d_ff = None  # keep "default" when it was the default
    if top_k > 1 or not base:
        moe.norm_topk_prob = bool(hf.get("norm_topk_prob", True)) if top_k > 1 else False
    if base and cfg.attention.head_dim is None and at.head_dim == cfg.d_model // max(1, at.num_heads):
        at.head_dim = None  # keep "default" when it was the default
    out = ModelConfig(
        pattern=pattern, d_model=hf["hidden_size"], vocab_size=hf["vocab_size"],
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        init_std=hf.get("initializer_range", cfg.init_std), mamba=mb, attention=at, mlp=mlp, moe=moe)
    return out, notes


def _model_config_from_dict(d: dict) -> ModelConfig:
    from pretrain.config import AttentionConfig, MambaConfig, MLPConfig, MoEConfig

    d = dict(d)
    subs = dict(mamba=MambaConfig(**d.pop("mamba")), attention=AttentionConfig(**d.pop("attention")),
                mlp=MLPConfig(**d.pop("mlp")), moe=MoEConfig(**d.pop("moe")))
    return ModelConfig(**d, **subs)


# ---------------------------------------------------------------------------------------------
# weights

Rule = tuple[str, str, Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]
same = (lambda t: t, lambda t: t)
conv = (lambda t: t.unsqueeze(1), lambda t: t.squeeze(1))  # (conv_dim, w) <-> (conv_dim, 1, w)


def _mixer_rules(kind: str, cfg: ModelConfig) -> list[Rule]:
    """(our name under mixer., their name under mixer., ours->theirs, theirs->ours) per tensor."""
    def linear(name: str, ours: str | None = None, bias: bool = False) -> list[Rule]:
        ours = ours or name
        rules = [(f"{ours}.weight", f"{name}.weight", *same)]
        return rules + ([(f"{ours}.bias", f"{name}.bias", *same)] if bias else [])

    if kind == "mamba":
        mb = cfg.mamba
        rules = linear("in_proj", bias=mb.proj_bias) + [("conv_weight", "conv1d.weight", *conv)]
        rules += [("conv_bias", "conv1d.bias", *same)] if mb.conv_bias else []
        rules += [(n, n, *same) for n in ("dt_bias", "A_log", "D")]
        return rules + [("norm_weight", "norm.weight", *same)] + linear("out_proj", bias=mb.proj_bias)
    if kind == "attention":
        return [r for p in ("q_proj", "k_proj", "v_proj", "o_proj") for r in linear(p)]
    if kind == "mlp":
        return linear("up_proj", bias=cfg.mlp.bias) + linear("down_proj", bias=cfg.mlp.bias)
    if kind == "moe":
        rules = [("gate.weight", "gate.weight", *same), ("gate.expert_bias", "gate.e_score_correction_bias", *same)]
        for j in range(cfg.moe.num_experts):
            rules += linear(f"experts.{j}.up_proj") + linear(f"experts.{j}.down_proj")
        if cfg.moe.num_shared_experts:
            rules += linear("shared_experts.up_proj") + linear("shared_experts.down_proj")
        return rules
    raise ValueError(f"unknown layer kind {kind!r}")


def name_pairs(cfg: ModelConfig) -> Iterator[tuple[str, str, Callable, Callable]]:
    """(our name, their name, ours->theirs, theirs->ours) for every tensor, in model order."""
    yield "embeddings.weight", "backbone.embeddings.weight", *same
    for i, kind in enumerate(layer_kinds(cfg.pattern)):
        yield f"layers.{i}.norm.weight", f"backbone.layers.{i}.norm.weight", *same
        for ours, theirs, fwd, back in _mixer_rules(kind, cfg):
            yield f"layers.{i}.mixer.{ours}", f"backbone.layers.{i}.mixer.{theirs}", fwd, back
    yield "norm_f.weight", "backbone.norm_f.weight", *same
    if not cfg.tie_embeddings:
        yield "lm_head.weight", "lm_head.weight", *same


def _zero_shared_expert(cfg: ModelConfig, i: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The all-zero shared expert of width 1 that stands for 'no shared expert' (relu2(0) = 0; its
    biases, present when mlp_bias, are zero too)."""
    p = f"backbone.layers.{i}.mixer.shared_experts"
    out = {f"{p}.up_proj.weight": torch.zeros(1, cfg.d_model, dtype=dtype),
           f"{p}.down_proj.weight": torch.zeros(cfg.d_model, 1, dtype=dtype)}
    if cfg.mlp.bias:
        out.update({f"{p}.up_proj.bias": torch.zeros(1, dtype=dtype), f"{p}.down_proj.bias": torch.zeros(cfg.d_model, dtype=dtype)})
    return out


def to_hf_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Our state dict -> NemotronH tensors (contiguous, own storage, `dtype`; router tensors float32)."""
    check_exportable(cfg)
    expected = {ours for ours, *_ in name_pairs(cfg)}
    state = {k: v for k, v in state.items() if not k.endswith("_extra_state")}  # megatron linears' extras
    if cfg.tie_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise KeyError(f"state dict does not match the model config: missing {missing[:8]}, "
                       f"unexpected {unexpected[:8]}" + (" ..." if len(missing) > 8 or len(unexpected) > 8 else ""))
    out: dict[str, torch.Tensor] = {}
    kinds = layer_kinds(cfg.pattern)
    for ours, theirs, fwd, _ in name_pairs(cfg):
        t = fwd(state[ours].detach().cpu())
        out[theirs] = t.to(torch.float32 if theirs.endswith(FP32_SUFFIXES) else dtype).contiguous().clone()
    for i, kind in enumerate(kinds):
        if kind == "moe" and not cfg.moe.num_shared_experts:
            out.update(_zero_shared_expert(cfg, i, dtype))
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["backbone.embeddings.weight"].clone()
    return out


def from_hf_tensors(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> tuple[dict[str, torch.Tensor], ModelConfig, list[str]]:
    """NemotronH tensors -> our state dict (dtypes kept), the config adjusted to what the tensors
    say (a non-zero 'absent' shared expert, an untied head), and notes."""
    notes: list[str] = []
    kinds = layer_kinds(cfg.pattern)
    moe_layers = [i for i, k in enumerate(kinds) if k == "moe"]
    if moe_layers and not cfg.moe.num_shared_experts:
        zero = all(not tensors[name].any() for i in moe_layers
                   for name in _zero_shared_expert(cfg, i, torch.float32) if name in tensors)
        if not zero:
            notes.append("n_shared_experts=0 but the shared experts are not zero (transformers 5 applies them): "
                         "imported with model.moe.num_shared_experts=1")
            width = tensors[f"backbone.layers.{moe_layers[0]}.mixer.shared_experts.up_proj.weight"].shape[0]
            cfg.moe.num_shared_experts, cfg.moe.shared_d_ff = 1, width
    if cfg.tie_embeddings and "lm_head.weight" in tensors and not torch.equal(
            tensors["lm_head.weight"], tensors["backbone.embeddings.weight"]):
        notes.append("tie_word_embeddings=true but lm_head.weight differs from the embedding (transformers 5 "
                     "uses lm_head.weight): imported untied")
        cfg.tie_embeddings = False
    state: dict[str, torch.Tensor] = {}
    used = set()
    for ours, theirs, _, back in name_pairs(cfg):
        if theirs not in tensors:
            raise KeyError(f"tensor {theirs!r} is missing from the export")
        state[ours] = back(tensors[theirs]).contiguous()
        used.add(theirs)
    if cfg.tie_embeddings:
        used.add("lm_head.weight")
    for i in moe_layers:
        if not cfg.moe.num_shared_experts:
            used.update(_zero_shared_expert(cfg, i, torch.float32).keys())
    left = sorted(k for k in tensors.keys() - used if not k.startswith("mtp."))
    if left:
        raise KeyError(f"tensors not understood by the model config: {left[:8]}" + (" ..." if len(left) > 8 else ""))
    return state, cfg, notes
