"""Config loading and validation: errors name the key and the value; derived values."""
from __future__ import annotations

import subprocess
import sys

import pytest

from pretrain.config import ConfigError, load_config, validate

DEMO = "configs/demo.yaml"


def test_demo_config_loads_and_validates():
    cfg = load_config([DEMO])
    derived = validate(cfg)
    assert derived.layer_kinds == ("mamba", "mlp", "mamba", "attention", "mamba", "mlp", "mamba", "moe")
    assert derived.dp == 1 and derived.grad_accum_steps == 1
    assert derived.run_dir.endswith("runs/demo")


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"model\.nonexistent"):
        load_config([DEMO], ["model.nonexistent=1"])


def test_unknown_key_in_yaml_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"optim\.learning_rate.*bad\.yaml"):
        load_config([DEMO, str(bad)])


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"model\.d_model"):
        load_config([DEMO], ["model.d_model=wide"])


def test_overrides_merge_in_order(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("trainer:\n  max_steps: 7\n")
    cfg = load_config([DEMO, str(extra)], ["trainer.log_interval=3"])
    assert cfg.trainer.max_steps == 7 and cfg.trainer.log_interval == 3


@pytest.mark.parametrize("override, key", [
    ("model.pattern=M-X*", "model.pattern"),
    ("model.attention.num_heads=3", "model.attention.num_heads"),
    ("model.mamba.num_groups=3", "model.mamba.num_groups"),
    ("data.global_batch_size=12", "data.global_batch_size"),
    ("model.moe.top_k=9", "model.moe.top_k"),
    ("optim.schedule=linear", "optim.schedule"),
    ("kernels.backend=cuda", "kernels.backend"),
    ("trainer.loss_chunk_tokens=-1", "trainer.loss_chunk_tokens"),
    ("model.moe.norm_topk_prob=false", "model.moe.norm_topk_prob"),  # demo: sigmoid router, top_k 2
])
def test_impossible_values_are_named(override, key):
    cfg = load_config([DEMO], [override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg)


def test_compile_is_accepted_in_every_build():
    """tests/parallel/test_compile_parallel.py trains the compiled parallel build against eager."""
    validate(load_config([DEMO], ["trainer.compile=true", "trainer.engine=megatron"]))
    validate(load_config([DEMO], ["trainer.compile=true", "data.micro_batch_size=4"]), world_size=2)
    validate(load_config([DEMO], ["trainer.compile=true"]))


def test_tp_not_dividing_heads_is_named():
    cfg = load_config(["configs/hybrid_460m.yaml"], ["parallel.tp=3"])
    with pytest.raises(ConfigError, match=r"num_heads=16.*parallel\.tp=3|parallel\.tp=3"):
        validate(cfg, world_size=3)


def test_world_size_must_divide_by_model_parallel():
    cfg = load_config([DEMO], ["parallel.tp=2"])
    with pytest.raises(ConfigError, match="world size 3"):
        validate(cfg, world_size=3)


def test_global_batch_gives_accumulation():
    cfg = load_config([DEMO], ["data.global_batch_size=32"])
    assert validate(cfg).grad_accum_steps == 4
    assert validate(cfg, world_size=2).grad_accum_steps == 2


def test_max_tokens_sets_the_step_count():
    cfg = load_config([DEMO], ["trainer.max_tokens=20000"])
    assert validate(cfg).total_steps == -(-20000 // (8 * 256))


def test_cli_unknown_key_fails_before_work():
    proc = subprocess.run([sys.executable, "-m", "pretrain.train", "--config", DEMO, "model.nonexistent=1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "model.nonexistent" in proc.stderr


def test_cli_print_config():
    proc = subprocess.run([sys.executable, "-m", "pretrain.train", "--config", DEMO, "--print-config",
                           "trainer.max_steps=5"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "max_steps: 5" in proc.stdout and "pattern: M-M*M-ME" in proc.stdout
