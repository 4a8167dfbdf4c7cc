"""Export mapping without transformers: names, round trips, incompatible configs, byte tokenizer, CLI."""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from export_helpers import VARIANT, build_model, demo_config, trained_checkpoint
from safetensors import safe_open

from data.tokenizer import ByteTokenizer
from pretrain.config import from_yaml_text, validate
from pretrain.export import export, import_export, main
from pretrain.export_nemotron_h import (from_hf_tensors, incompatibilities, model_config_from_hf, name_pairs,
                                        to_hf_tensors)
from pretrain.export_tokenizer import byte_tokenizer
from pretrain.model import HybridLM


@pytest.mark.parametrize("variant", [[], VARIANT], ids=["nemotron_h_like", "variant"])
def test_mapping_round_trip_in_memory(variant):
    cfg = demo_config(*variant)
    model = build_model(cfg)
    state = model.state_dict()
    ours = {o for o, *_ in name_pairs(cfg.model)}
    assert ours == set(state) - ({"lm_head.weight"} if cfg.model.tie_embeddings else set())
    hf = to_hf_tensors(state, cfg.model, torch.float32)
    assert all(k.startswith(("backbone.", "lm_head.")) for k in hf)
    conv = next(k for k in hf if k.endswith("conv1d.weight"))
    assert hf[conv].shape == (cfg.model.mamba.num_heads * cfg.model.mamba.head_dim
                              + 2 * cfg.model.mamba.num_groups * cfg.model.mamba.d_state, 1, cfg.model.mamba.d_conv)
    assert "lm_head.weight" in hf  # written even when tied: transformers 5 does not tie NemotronH
    back, back_cfg, notes = from_hf_tensors(hf, cfg.model)
    assert notes == [] and asdict(back_cfg) == asdict(cfg.model)
    assert back.keys() == ours
    for k in ours:
        assert torch.equal(back[k], state[k]), k


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("model-*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def _digests(directory: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(directory.glob("model*"))}


@pytest.mark.parametrize("variant,dtype", [([], "bf16"), (VARIANT, "fp32")], ids=["nemotron_h_like-bf16", "variant-fp32"])
def test_export_import_export_is_byte_identical(tmp_path, variant, dtype):
    cfg, model = trained_checkpoint(tmp_path / "ckpt", *variant)
    export(tmp_path / "ckpt", tmp_path / "hf1", dtype=dtype, max_shard_size="150KB", quiet=True)
    import_export(tmp_path / "hf1", tmp_path / "imported", quiet=True)
    export(tmp_path / "imported", tmp_path / "hf2", dtype=dtype, max_shard_size="150KB", quiet=True)

    first, second = _tensors(tmp_path / "hf1"), _tensors(tmp_path / "hf2")
    assert len(list((tmp_path / "hf1").glob("model-*-of-*.safetensors"))) > 1  # sharded
    assert first.keys() == second.keys()
    for k in first:
        assert first[k].dtype == second[k].dtype and first[k].shape == second[k].shape, k
        assert first[k].view(torch.uint8).equal(second[k].view(torch.uint8)), k
    assert _digests(tmp_path / "hf1") == _digests(tmp_path / "hf2")  # shards and index, byte for byte
    assert json.loads((tmp_path / "hf1/config.json").read_text()) == json.loads((tmp_path / "hf2/config.json").read_text())

    # the imported checkpoint is our format: same model config, loads strictly into HybridLM
    imported = from_yaml_text((tmp_path / "imported/config.yaml").read_text())
    assert asdict(imported.model) == asdict(cfg.model)
    imported.data.path = "unused"
    again = HybridLM(imported.model, validate(imported))
    again.load_state_dict(torch.load(tmp_path / "imported/model.pt", weights_only=True))
    if dtype == "fp32":  # lossless: the imported model computes exactly what the trained one does
        tokens = torch.randint(0, 257, (2, 20), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            assert torch.equal(again(tokens), model(tokens))


def test_export_files_and_config_fields(tmp_path):
    cfg, _ = trained_checkpoint(tmp_path / "ckpt", steps=1)
    export(tmp_path / "ckpt", tmp_path / "hf", quiet=True)
    out = tmp_path / "hf"
    for name in ("config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "model-00001-of-00001.safetensors"):
        assert (out / name).is_file(), name
    c = json.loads((out / "config.json").read_text())
    m = cfg.model
    assert c["model_type"] == "nemotron_h" and c["architectures"] == ["NemotronHForCausalLM"]
    assert c["hybrid_override_pattern"] == m.pattern.replace("|", "")
    assert c["layers_block_type"][:4] == ["linear_attention", "mlp", "linear_attention", "moe"]
    assert (c["hidden_size"], c["vocab_size"], c["mamba_num_heads"], c["mamba_head_dim"], c["n_groups"],
            c["ssm_state_size"], c["conv_kernel"], c["chunk_size"]) == (64, 264, 4, 16, 2, 16, 4, 16)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (4, 2, 16)
    assert (c["intermediate_size"], c["mlp_hidden_act"], c["n_routed_experts"], c["num_experts_per_tok"],
            c["moe_intermediate_size"], c["moe_shared_expert_intermediate_size"], c["n_shared_experts"],
            c["routed_scaling_factor"], c["norm_topk_prob"]) == (128, "relu2", 4, 2, 64, 96, 1, 2.5, True)
    assert (c["time_step_min"], c["time_step_limit"]) == (0.0, [0.0, float("inf")])
    assert c["eos_token_id"] == c["pad_token_id"] == 256 and c["dtype"] == "bfloat16"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    with safe_open(str(out / "model-00001-of-00001.safetensors"), framework="pt") as st:
        assert set(index["weight_map"]) == set(st.keys())
        assert st.get_tensor("backbone.layers.3.mixer.gate.e_score_correction_bias").dtype == torch.float32
        assert st.get_tensor("backbone.layers.3.mixer.gate.e_score_correction_bias").abs().max() > 0
        assert st.get_tensor("backbone.layers.3.mixer.experts.0.up_proj.weight").dtype == torch.bfloat16


def test_import_published_style_config(tmp_path):
    """A NemotronH config.json without our `hybrid_pretrain` block (as published) imports too, and
    re-exports the same tensors."""
    trained_checkpoint(tmp_path / "ckpt", steps=1)
    export(tmp_path / "ckpt", tmp_path / "hf1", dtype="fp32", quiet=True)
    c = json.loads((tmp_path / "hf1/config.json").read_text())
    del c["hybrid_pretrain"], c["hybrid_override_pattern"]
    (tmp_path / "hf1/config.json").write_text(json.dumps(c))
    import_export(tmp_path / "hf1", tmp_path / "imported", quiet=True)
    export(tmp_path / "imported", tmp_path / "hf2", dtype="fp32", quiet=True)
    first, second = _tensors(tmp_path / "hf1"), _tensors(tmp_path / "hf2")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    cfg, notes = model_config_from_hf(c)
    assert cfg.pattern == "M-ME*-MEM*E-" and notes == []


def test_incompatible_config_lists_every_field(tmp_path, capsys):
    bad = ["model.mlp.activation=swiglu", "model.moe.activation=swiglu", "model.moe.router=softmax_aux",
           "model.attention.rope=true", "model.attention.bias=true", "model.mamba.norm_before_gate=true",
           "model.mamba.dt_limit_max=1.0"]
    cfg, _ = trained_checkpoint(tmp_path / "ckpt", *bad, steps=1)
    problems = incompatibilities(cfg.model)
    assert len(problems) == len(bad), problems
    assert main(["--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    for override in bad:
        key = override.split("=")[0]
        assert key in err, key
    for fix in ("model.mlp.activation=relu2 would export", "model.moe.activation=relu2 would export",
                "model.moe.router=sigmoid_bias would export", "model.attention.rope=false would export",
                "model.attention.bias=false would export", "model.mamba.norm_before_gate=false would export",
                "model.mamba.dt_limit_max=inf would export"):
        assert fix in err, fix
    assert not (tmp_path / "hf").exists()  # stopped before writing anything


def test_cli_reads_latest_and_refuses_a_full_out_dir(tmp_path, capsys):
    ckpts = tmp_path / "run" / "checkpoints"
    trained_checkpoint(ckpts / "step_00000002", steps=1)
    (ckpts / "latest").write_text("step_00000002\n")
    assert main(["--checkpoint", str(ckpts / "latest"), "--out", str(tmp_path / "hf"), "--dtype", "fp32"]) == 0
    assert "total" in capsys.readouterr().err  # the parameter summary
    assert main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf"), "--force"]) == 0
    assert main(["--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    # a tokenizer.json is copied, with a tokenizer_config.json naming the EOS token found in it
    byte_tokenizer().save(str(tmp_path / "tokenizer.json"))
    assert main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf_tok"),
                 "--tokenizer", str(tmp_path / "tokenizer.json")]) == 0
    assert (tmp_path / "hf_tok/tokenizer.json").read_bytes() == (tmp_path / "tokenizer.json").read_bytes()
    assert json.loads((tmp_path / "hf_tok/tokenizer_config.json").read_text())["eos_token"] == "<|endoftext|>"
    assert json.loads((tmp_path / "hf_tok/config.json").read_text())["eos_token_id"] == 256
    assert main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf_x"), "--tokenizer", "/nope.json"]) == 2
    assert "'/nope.json' (--tokenizer) not found" in capsys.readouterr().err


def test_byte_tokenizer_json_is_exact():
    ours, tok = ByteTokenizer(), byte_tokenizer()
    tok.encode_special_tokens = True
    rng = random.Random(0)
    texts = ["", "hello world", "  two  spaces\n\ttab", "héllo — ünïcödé 🤗 中文", "\x00\x7f\xff", "a" * 300]
    for _ in range(200):
        texts.append("".join(chr(rng.choice([rng.randrange(0, 128), rng.randrange(0x80, 0x800),
                                              rng.randrange(0x800, 0xD7FF), rng.randrange(0x10000, 0x110000)]))
                             for _ in range(rng.randrange(0, 40))))
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert ids == ours.encode(text), repr(text)
        assert tok.decode(ids) == ours.decode(ids) == text
    assert tok.get_vocab_size() == 257 and tok.token_to_id("<|endoftext|>") == ours.eos_id
    assert tok.decode([104, 105, 255, 256]) == ours.decode([104, 105, 255, 256])  # invalid UTF-8 -> U+FFFD
