"""The autotuned launchers' shipped table (kernels/_triton_utils.py): a listed GPU, kernel and key
launches its config directly without tuning; other keys tune, and with recording on their choices
are written to (merged into) the table; kernels.deterministic takes the fixed config. Fake kernels
stand in for Triton's (no GPU here): they record what they were launched with."""
from __future__ import annotations

import json

import pytest
import torch
import triton

import kernels
from kernels import _triton_utils as tu


class FakeKernel:
    __name__ = "_fake_kernel"
    arg_names = ["x_ptr", "n", "FLAG"]

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            meta = {**kwargs}
            self.launches.append((grid(meta) if callable(grid) else grid, args, kwargs))
        return launch


class FakeTuned(FakeKernel):
    best_config = triton.Config({"BLOCK": 64}, num_warps=4, num_stages=2)


@pytest.fixture
def fakes(monkeypatch):
    monkeypatch.setattr(tu, "_device_name", lambda args: "Fake GPU")
    monkeypatch.setattr(tu, "_table", {})
    monkeypatch.setattr(tu, "_record", False)
    monkeypatch.setattr(tu, "_launchers", [])
    kernel, tuned, fixed = FakeKernel(), FakeTuned(), FakeKernel()
    return tu._Launcher(tuned, fixed, kernel, key=["n", "FLAG"]), kernel, tuned, fixed


def test_choices_written_then_read_back_without_tuning(fakes, tmp_path, monkeypatch):
    launcher, kernel, tuned, fixed = fakes
    x = torch.zeros(3, dtype=torch.bfloat16)
    grid = lambda meta: (1024 // meta.get("BLOCK", 1024),)  # noqa: E731
    launcher[grid](x, 128, FLAG=True)  # not recording: tuned, nothing remembered
    assert len(tuned.launches) == 1 and launcher.chosen == {}
    tu.record_tuning()
    launcher[grid](x, 128, FLAG=True)
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"Fake GPU": {"_other_kernel": {"k": {"kwargs": {}, "num_warps": 1, "num_stages": 1}}}}))
    assert tu.write_tuned_table(path) == 1
    table = json.loads(path.read_text())
    assert table["Fake GPU"]["_fake_kernel"] == {"n=128,FLAG=True,bfloat16": {"kwargs": {"BLOCK": 64}, "num_warps": 4,
                                                                                "num_stages": 2}}
    assert "_other_kernel" in table["Fake GPU"]  # merged, not overwritten

    monkeypatch.setattr(tu, "_table", table)
    monkeypatch.setattr(tu, "_record", False)
    launcher[grid](x, 128, FLAG=True)  # listed: the raw kernel with the table's config, no tuning
    assert len(tuned.launches) == 2
    g, args, kw = kernel.launches[-1]
    assert g == (16,) and args == (x, 128) and kw == {"FLAG": True, "BLOCK": 64, "num_warps": 4, "num_stages": 2}
    launcher[grid](x, 256, FLAG=True)  # another key: tuned
    launcher[grid](x.float(), 128, FLAG=True)  # another dtype: tuned
    assert len(tuned.launches) == 4 and len(kernel.launches) == 1


def test_deterministic_takes_the_fixed_config_even_when_listed(fakes, monkeypatch):
    launcher, kernel, tuned, fixed = fakes
    x = torch.zeros(3, dtype=torch.bfloat16)
    monkeypatch.setattr(tu, "_table", {"Fake GPU": {"_fake_kernel": {
        "n=128,FLAG=True,bfloat16": {"kwargs": {"BLOCK": 64}, "num_warps": 4, "num_stages": 2}}}})
    kernels.set_deterministic(True)
    try:
        launcher[(1,)](x, 128, FLAG=True)
    finally:
        kernels.set_deterministic(False)
    assert len(fixed.launches) == 1 and not kernel.launches and not tuned.launches


def test_shipped_table_entries_name_known_kernels_and_configs():
    """Whatever the table holds (it is written on the GPU) must name a kernel of ours and give a
    complete config, or a typo would silently fall back to tuning."""
    if not tu.TABLE_PATH.exists():
        pytest.skip("no tuned table shipped yet (written by bench/*.py --write-tuned on a GPU)")
    table = json.loads(tu.TABLE_PATH.read_text())
    import importlib

    # every autotuned launcher registers its kernel's name (kernels.<op> names the op function, so
    # the submodules are imported by path)
    importlib.import_module("kernels.conv1d.triton_op")
    rms = importlib.import_module("kernels.rmsnorm_gated.triton_op")
    bwd = importlib.import_module("kernels.ssd.triton_bwd")
    bwd_dx = importlib.import_module("kernels.ssd.triton_bwd_dx")
    fwd = importlib.import_module("kernels.ssd.triton_fwd")
    states = importlib.import_module("kernels.ssd.triton_states")

    for block_g in (1024, 2048, 4096):
        rms._bwd_launcher(block_g)
    for chunk in (64, 128, 256):
        for per_chunk in (fwd._chunk_scan_tuned, states._chunk_outer_tuned, bwd_dx._chunk_dx_tuned,
                          bwd._chunk_dcb_tuned, bwd._chunk_dbc_tuned):
            per_chunk(chunk)
    names = {launcher.name for launcher in tu._launchers}
    assert "_chunk_dcb_kernel" in names and "_rms_bwd_kernel" in names
    for gpu, by_kernel in table.items():
        assert set(by_kernel) <= names, (gpu, set(by_kernel) - names)
        for entries in by_kernel.values():
            for key, cfg in entries.items():
                assert {"kwargs", "num_warps", "num_stages"} <= set(cfg) <= {"kwargs", "num_warps", "num_stages",
                                                                             "maxnreg"}, key


def test_a_stale_entry_is_ignored_with_a_warning(fakes, monkeypatch):
    """An entry written by an older version of the kernel (a meta-parameter it no longer has) would
    fail at launch: it is skipped, once warned, and the autotuner chooses."""
    _, kernel, tuned, fixed = fakes
    tuned.configs = [FakeTuned.best_config]
    launcher = tu._Launcher(tuned, fixed, kernel, key=["n", "FLAG"])
    x = torch.zeros(3, dtype=torch.bfloat16)
    monkeypatch.setattr(tu, "_table", {"Fake GPU": {"_fake_kernel": {
        "n=128,FLAG=True,bfloat16": {"kwargs": {"BLOCK": 64, "GONE": False}, "num_warps": 4, "num_stages": 2}}}})
    with pytest.warns(UserWarning, match="sets \\['BLOCK', 'GONE'\\].*configs set \\['BLOCK'\\]"):
        launcher[(1,)](x, 128, FLAG=True)
    launcher[(1,)](x, 128, FLAG=True)  # no second warning (pytest's filter would turn it into an error below)
    assert len(tuned.launches) == 2 and kernel.launches == []


def test_register_cap_and_a_default_meta_parameter_round_trip(fakes, tmp_path, monkeypatch):
    """A config that caps registers (maxnreg) is written with its cap and launched with it; a config
    may leave a meta-parameter to the kernel's default while others set it, and an entry of either
    key set is used (an entry matches one config's set of meta-parameters, not their union)."""
    _, kernel, tuned, fixed = fakes
    capped = triton.Config({"BLOCK": 64, "STAGES": 3}, num_warps=8, num_stages=3, maxnreg=128)
    tuned.configs = [FakeTuned.best_config, capped]
    tuned.best_config = capped
    launcher = tu._Launcher(tuned, fixed, kernel, key=["n", "FLAG"])
    x = torch.zeros(3, dtype=torch.bfloat16)
    tu.record_tuning()
    launcher[(1,)](x, 128, FLAG=True)
    path = tmp_path / "table.json"
    assert tu.write_tuned_table(path) == 1
    table = json.loads(path.read_text())
    assert table["Fake GPU"]["_fake_kernel"]["n=128,FLAG=True,bfloat16"] == {
        "kwargs": {"BLOCK": 64, "STAGES": 3}, "num_warps": 8, "num_stages": 3, "maxnreg": 128}
    table["Fake GPU"]["_fake_kernel"]["n=256,FLAG=True,bfloat16"] = {
        "kwargs": {"BLOCK": 32}, "num_warps": 4, "num_stages": 2}  # the other config's key set
    monkeypatch.setattr(tu, "_table", table)
    monkeypatch.setattr(tu, "_record", False)
    launcher[(1,)](x, 128, FLAG=True)
    launcher[(1,)](x, 256, FLAG=True)
    assert [kw for _, _, kw in kernel.launches] == [
        {"FLAG": True, "BLOCK": 64, "STAGES": 3, "num_warps": 8, "num_stages": 3, "maxnreg": 128},
        {"FLAG": True, "BLOCK": 32, "num_warps": 4, "num_stages": 2}]
    assert len(tuned.launches) == 1  # both from the table


def test_the_shipped_table_names_only_parameters_the_kernels_have():
    """kernels/tuned_configs.json against the kernels as they are: every entry's kernel exists and
    every meta-parameter it sets is one of that kernel's parameters (a kernel change that drops one
    must rewrite or drop the entries, or they are ignored at run time)."""
    import importlib

    modules = [importlib.import_module(m) for m in (
        "kernels.ssd.triton_fwd", "kernels.ssd.triton_bwd", "kernels.ssd.triton_bwd_dx", "kernels.ssd.triton_bwd_scan",
        "kernels.ssd.triton_states",
        "kernels.conv1d.triton_op", "kernels.rmsnorm_gated.triton_op")]
    path = tu.Path(tu.__file__).with_name("tuned_configs.json")
    table = json.loads(path.read_text())
    assert table, "no shipped table"
    for gpu, by_kernel in table.items():
        for name, entries in by_kernel.items():
            fns = [getattr(m, name) for m in modules if hasattr(m, name)]
            assert len(fns) == 1, (gpu, name)
            params = set(fns[0].arg_names)
            for key, entry in entries.items():
                assert set(entry["kwargs"]) <= params, (gpu, name, key, set(entry["kwargs"]) - params)
                assert entry["num_warps"] in (1, 2, 4, 8, 16) and entry["num_stages"] >= 1, (gpu, name, key)


def test_with_config_launches_one_clamped_config_without_tuning():
    """autotune_per_chunk(...).with_config(i, chunk, state): the i-th config, its tiles clamped as the
    tuner's list clamps them, launched directly (grid from its meta-parameters, register cap passed)."""
    kernel = FakeKernel()
    configs = tu.configs_of([(dict(BLOCK_K=64, BLOCK_N=128), 4, 2), (dict(BLOCK_K=128, BLOCK_N=64), 8, 3, 128)])
    per_chunk = tu.autotune_per_chunk(kernel, configs, key=["n"], chunk_params=("BLOCK_K",), state_params=("BLOCK_N",))
    assert per_chunk.num_configs == 2
    x = torch.zeros(3)
    per_chunk.with_config(1, 32, 16)[lambda meta: (256 // meta["BLOCK_K"],)](x, 7, FLAG=False)
    grid, args, kw = kernel.launches[-1]
    assert grid == (8,) and args == (x, 7)
    assert kw == {"FLAG": False, "BLOCK_K": 32, "BLOCK_N": 16, "num_warps": 8, "num_stages": 3, "maxnreg": 128}
