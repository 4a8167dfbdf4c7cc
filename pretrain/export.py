"""Export a trained model to a Hugging Face NemotronH checkpoint, and import one back.

    python -m pretrain.export --checkpoint runs/<name>/checkpoints/latest --out hf/<name> [--dtype bf16|fp32]
    python -m pretrain.export --to-checkpoint --checkpoint hf/<name> --out imported/<name>

Export writes config.json (model_type nemotron_h), model-0000x-of-0000y.safetensors shards with
model.safetensors.index.json, generation_config.json and the tokenizer files into --out; the
directory loads with `AutoModelForCausalLM.from_pretrained(out)` in transformers >= 5 (no remote
code). Configs NemotronH cannot express stop with one message listing each field. The name and
weight mapping, and where NemotronH's semantics differ from ours, live in pretrain/export_nemotron_h.py.

--checkpoint accepts:
- a training checkpoint (runs/<name>/checkpoints/step_XXXXXXXX/, the `latest` file, the checkpoints
  directory or the run directory), saved under any tp/pp/ep/dp layout: read on one CPU process by
  pretrain/export_checkpoint.py (megatron dist_checkpointing into the single-process model);
- a directory with model.pt (a torch.save'd HybridLM state dict) and config.yaml (our resolved
  config): what --to-checkpoint writes.

--to-checkpoint reads an export (ours or a compatible published NemotronH checkpoint) and writes
model.pt + config.yaml (the model section from config.json; the other sections are defaults to
merge with your training config). Export -> import -> export gives byte-identical tensors.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from pretrain.config import Config, ConfigError, ModelConfig, from_yaml_text, to_yaml
from pretrain.export_nemotron_h import (IncompatibleConfig, check_exportable, from_hf_tensors, hf_config,
                                        layer_kinds, model_config_from_hf, to_hf_tensors)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16"}
STATE_FILE, CONFIG_FILE = "model.pt", "config.yaml"


class ExportError(RuntimeError):
    """A problem the user can fix (path, format, config); the message names it."""


# ---------------------------------------------------------------------------------------------
# reading our checkpoints


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory from: itself, a `latest` file, a checkpoints dir or run dir holding `latest`."""
    p = Path(path)
    for candidate in (p, p / "latest", p / "checkpoints" / "latest"):
        if candidate.is_file() and candidate.name == "latest":
            name = candidate.read_text().strip()
            step = Path(name) if os.path.isabs(name) else candidate.parent / name
            if not step.is_dir():
                raise ExportError(f"{candidate} names {name!r}, but {step} is not a directory")
            return step
    if not p.is_dir():
        raise ExportError(f"checkpoint not found: {p}")
    return p


def load_model_checkpoint(path: str | Path) -> tuple[Config, dict[str, torch.Tensor], Path]:
    """(config, state dict of full CPU tensors, resolved directory) of a model checkpoint."""
    step = resolve_checkpoint(path)
    if (step / STATE_FILE).is_file():
        if not (step / CONFIG_FILE).is_file():
            raise ExportError(f"{step / STATE_FILE} has no {CONFIG_FILE} beside it (the resolved config)")
        try:
            cfg = from_yaml_text((step / CONFIG_FILE).read_text())
        except Exception as err:
            raise ExportError(f"cannot read {step / CONFIG_FILE}: {err}") from None
        state = torch.load(step / STATE_FILE, map_location="cpu", weights_only=True)
        return cfg, state, step
    from pretrain.export_checkpoint import CheckpointReadError, is_training_checkpoint, load_training_checkpoint

    if not is_training_checkpoint(step):
        raise ExportError(f"{step} is neither a training checkpoint (.metadata, common.pt) nor a directory with "
                          f"{STATE_FILE} + {CONFIG_FILE}")
    try:
        cfg, state = load_training_checkpoint(step)
    except CheckpointReadError as err:
        raise ExportError(str(err)) from None
    return cfg, state, step


def save_model_checkpoint(cfg: Config, state: dict[str, torch.Tensor], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.save(state, out / STATE_FILE)
    (out / CONFIG_FILE).write_text(to_yaml(cfg))


# ---------------------------------------------------------------------------------------------
# derived sizes and the parameter summary


def attention_head_dim(cfg: ModelConfig) -> int:
    at = cfg.attention
    return at.head_dim if at.head_dim is not None else cfg.d_model // max(1, at.num_heads)


def shared_d_ff(cfg: ModelConfig) -> int:
    return cfg.moe.shared_d_ff if cfg.moe.shared_d_ff is not None else cfg.moe.d_ff


def parameter_summary(state: dict[str, torch.Tensor], cfg: ModelConfig) -> str:
    kinds = layer_kinds(cfg.pattern)
    groups: dict[str, int] = {}
    for name, t in state.items():
        if name.endswith("expert_bias"):
            continue  # a buffer, not a parameter
        parts = name.split(".")
        if parts[0] == "layers" and parts[2] == "mixer":
            kind = kinds[int(parts[1])]
            if kind == "moe":
                kind = {"experts": "moe experts (routed)", "shared_experts": "moe shared expert",
                        "gate": "moe router"}[parts[3]]
            group = kind
        elif parts[0] == "layers" or parts[0] == "norm_f":
            group = "norms"
        else:
            group = {"embeddings": "embedding", "lm_head": "lm_head"}[parts[0]]
        groups[group] = groups.get(group, 0) + t.numel()
    total = sum(groups.values())
    routed = groups.get("moe experts (routed)", 0)
    active = total - routed + (routed * cfg.moe.top_k // cfg.moe.num_experts if routed else 0)
    width = max(len(k) for k in groups)
    lines = [f"  {k:<{width}}  {v:>14,}  {100 * v / total:5.1f}%" for k, v in sorted(groups.items(), key=lambda kv: -kv[1])]
    lines.append(f"  {'total':<{width}}  {total:>14,}")
    if routed:
        lines.append(f"  {'active per token':<{width}}  {active:>14,}  (top {cfg.moe.top_k} of {cfg.moe.num_experts} experts)")
    if cfg.tie_embeddings:
        lines.append("  (embedding tied to the LM head; lm_head.weight is written as a copy)")
    return "parameters:\n" + "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# writing safetensors


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for unit, mult in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(t)


def write_shards(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int, progress: bool = True) -> int:
    """model-0000x-of-0000y.safetensors + model.safetensors.index.json; returns the number of shards."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map = {}
    total_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="writing safetensors", file=sys.stderr,
              disable=not progress) as bar:
        for i, names in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({n: tensors[n] for n in names}, str(out / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in names})
            bar.update(sum(tensors[n].numel() * tensors[n].element_size() for n in names))
    index = {"metadata": {"total_size": total_bytes,
                          "total_parameters": sum(t.numel() for t in tensors.values())},
             "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return len(shards)


def read_safetensors(src: Path, progress: bool = True) -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    from tqdm import tqdm

    index = src / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (src / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ExportError(f"{src} holds neither model.safetensors.index.json nor model.safetensors")
    tensors: dict[str, torch.Tensor] = {}
    for fname in tqdm(files, desc="reading safetensors", file=sys.stderr, disable=not progress):
        with safe_open(str(src / fname), framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


# ---------------------------------------------------------------------------------------------
# the two directions


def prepare_out(out: Path, force: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not force:
            raise ExportError(f"output directory {out} is not empty (pass --force to overwrite)")
        for old in out.glob("model-*-of-*.safetensors"):
            old.unlink()
    out.mkdir(parents=True, exist_ok=True)


def export(checkpoint: str | Path, out: str | Path, *, dtype: str = "bf16", tokenizer: str | None = None,
           max_shard_size: str = "5GB", force: bool = False, quiet: bool = False) -> Path:
    """Our checkpoint -> a Hugging Face NemotronH directory; returns the directory."""
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr))
    out = Path(out)
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    cfg, state, step = load_model_checkpoint(checkpoint)
    check_exportable(cfg.model)  # before any work: incompatible configs stop here
    spec = tokenizer if tokenizer is not None else cfg.data.tokenizer
    if spec not in ("bytes", "none") and not Path(spec).expanduser().is_file():
        origin = "--tokenizer" if tokenizer is not None else f"data.tokenizer of {step}"
        raise ExportError(f"tokenizer {spec!r} ({origin}) not found; pass --tokenizer PATH or --tokenizer none")
    prepare_out(out, force)
    say(f"export {step} -> {out} (NemotronH, {DTYPE_NAMES[DTYPES[dtype]]})")
    eos_id, what = (None, "none") if spec == "none" else _write_tokenizer(spec, out, cfg.data.seq_len)
    tensors = to_hf_tensors(state, cfg.model, DTYPES[dtype])
    config = hf_config(cfg.model, attention_head_dim=attention_head_dim(cfg.model), shared_d_ff=shared_d_ff(cfg.model),
                       dtype=DTYPE_NAMES[DTYPES[dtype]], eos_token_id=eos_id, bos_token_id=None,
                       pad_token_id=eos_id, max_position_embeddings=cfg.data.seq_len)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"_from_model_config": True, "eos_token_id": eos_id, "pad_token_id": eos_id}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    num_shards = write_shards(tensors, out, parse_size(max_shard_size), progress=not quiet)
    say(parameter_summary(state, cfg.model))
    say(f"wrote {out}: config.json, {num_shards} safetensors shard(s) + index, generation_config.json, "
        f"tokenizer: {what}")
    return out


def _write_tokenizer(spec: str, out: Path, seq_len: int) -> tuple[int, str]:
    from pretrain.export_tokenizer import write_tokenizer

    return write_tokenizer(spec, out, seq_len)


def import_export(src: str | Path, out: str | Path, *, force: bool = False, quiet: bool = False) -> Path:
    """A Hugging Face NemotronH directory -> model.pt + config.yaml in `out`; returns `out`."""
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr))
    src, out = Path(src), Path(out)
    if not (src / "config.json").is_file():
        raise ExportError(f"{src / 'config.json'} not found (is {src} a Hugging Face export?)")
    hf = json.loads((src / "config.json").read_text())
    if hf.get("model_type") != "nemotron_h":
        raise ExportError(f"{src / 'config.json'}: model_type={hf.get('model_type')!r}, expected 'nemotron_h'")
    model_cfg, notes = model_config_from_hf(hf)
    tensors = read_safetensors(src, progress=not quiet)
    state, model_cfg, more = from_hf_tensors(tensors, model_cfg)
    cfg = Config(model=model_cfg)
    cfg.data.tokenizer = str(src / "tokenizer.json") if (src / "tokenizer.json").is_file() else cfg.data.tokenizer
    if hf.get("max_position_embeddings"):
        cfg.data.seq_len = int(hf["max_position_embeddings"])
    prepare_out(out, force)
    save_model_checkpoint(cfg, state, out)
    for note in notes + more:
        say(f"note: {note}")
    say(parameter_summary(state, model_cfg))
    say(f"wrote {out / STATE_FILE} and {out / CONFIG_FILE}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pretrain.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True,
                    help="our checkpoint (step dir, `latest`, or model.pt + config.yaml dir); with --to-checkpoint "
                         "a Hugging Face NemotronH directory")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="weight dtype of the export (router "
                    "weights and expert bias stay float32)")
    ap.add_argument("--tokenizer", default=None,
                    help="'bytes', a tokenizer.json, or 'none' (default: data.tokenizer of the checkpoint's config)")
    ap.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB")
    ap.add_argument("--to-checkpoint", action="store_true", help="import a NemotronH export into our format")
    ap.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    args = ap.parse_args(argv)
    try:
        if args.to_checkpoint:
            import_export(args.checkpoint, args.out, force=args.force)
        else:
            export(args.checkpoint, args.out, dtype=args.dtype, tokenizer=args.tokenizer,
                   max_shard_size=args.max_shard_size, force=args.force)
    except (ExportError, IncompatibleConfig, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
