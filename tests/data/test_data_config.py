"""The data section of the config: data.streams / data.validation load from YAML and fail with the key named."""
from __future__ import annotations

import pytest

from pretrain.config import ConfigError, load_config, stream_dicts, validate

DEMO = "configs/demo.yaml"


def _with_yaml(tmp_path, text):
    extra = tmp_path / "extra.yaml"
    extra.write_text(text)
    return load_config([DEMO, str(extra)])


def test_streams_from_yaml(tmp_path):
    cfg = _with_yaml(tmp_path, """
data:
  path: ""
  streams:
    - {path: data/web, proportion: 0.7}
    - {remote: "s3://bucket/code", local: /cache/code, proportion: 0.3}
""")
    validate(cfg)
    dicts = stream_dicts(cfg.data.path, cfg.data.streams)
    assert dicts[0]["path"] == "data/web" and dicts[0]["proportion"] == 0.7
    assert dicts[1]["remote"] == "s3://bucket/code" and dicts[1]["local"] == "/cache/code"
    assert stream_dicts(cfg.data.path, []) is None  # data.path is the one-stream case


@pytest.mark.parametrize("text, message", [
    ("data:\n  path: ''\n", r"data\.path='': must name a prepared dataset.*data\.streams"),
    ("data:\n  path: ''\n  streams: [{proportion: 1.0}]\n", r"data\.streams\[0\]\.path is missing"),
    ("data:\n  path: ''\n  streams: [{path: a, proportion: 0.0}]\n", r"data\.streams\[0\]\.proportion=0\.0"),
    ("data:\n  path: ''\n  streams: [{path: a, proportion: 1}, {path: b}]\n", r"data\.streams\[1\]: no proportion"),
    ("data:\n  streams: [{path: a}]\n", r"data\.path=.*and data\.streams are both set"),
    ("data:\n  validation: {streams: [{remote: 's3://x/y'}]}\n", r"data\.validation\.streams\[0\]\.local is missing"),
    ("trainer:\n  eval_interval: 5\n", r"trainer\.eval_interval=5: needs validation data"),
    ("trainer:\n  eval_steps: 0\n", r"trainer\.eval_steps=0"),
])
def test_bad_streams_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        validate(_with_yaml(tmp_path, text))


def test_unknown_stream_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.streams\[0\]\.weight|weight"):
        _with_yaml(tmp_path, "data:\n  streams: [{path: a, weight: 2}]\n")
