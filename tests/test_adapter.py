"""LoRA adapter folders (models/lora.py) load wherever a model folder goes, shipped ones by name
(`mini:NAME`, models/mini.py), and a broken one fails in one line naming the file."""

import json
import shutil

import pytest
import torch

import tars.models.mini as mini
from conftest import good_row, run_cli, write_jsonl
from tars.data.schema import Record
from tars.errors import UserError
from tars.models.loading import load_backend
from tars.models.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, merge_lora
from tiny_models import tiny_adapter, tiny_qwen2_audio

IDS = [[5, 9, 14, 2]]


def text_logprobs(backend):
    inputs = backend.build_inputs([Record(**good_row())], "text", None)
    return backend.score(inputs, IDS, [0]).logprobs


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny base model and an adapter on it whose B is not zero (a fresh LoRA would be the identity),
    with the log-probs the LoRA-carrying model gives."""
    root = tmp_path_factory.mktemp("adapter")
    base = tiny_qwen2_audio(root / "tiny")
    be = tiny_adapter(base, root / "adapter")
    with torch.no_grad():
        expected = text_logprobs(be)
        merge_lora(be)
        assert torch.allclose(text_logprobs(be), expected, atol=1e-5)
        plain = text_logprobs(load_backend(base))
    assert not torch.allclose(plain, expected, atol=1e-3)  # the adapter does change the model
    return base, root / "adapter", expected


def test_an_adapter_folder_loads_as_its_base_with_the_lora_merged(trained):
    _, adapter, expected = trained
    be = load_backend(adapter)
    assert not any("lora" in n for n, _ in be.decoder().named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(text_logprobs(be), expected, atol=1e-5, rtol=0)


def test_an_adapter_whose_base_moved_is_found_by_its_given_name(trained, tmp_path):
    base, adapter, expected = trained
    moved = tmp_path / "adapter"
    shutil.copytree(adapter, moved)
    meta = json.loads((moved / ADAPTER_CONFIG).read_text())
    meta["base_model_path"] = str(tmp_path / "gone")
    (moved / ADAPTER_CONFIG).write_text(json.dumps(meta))
    with torch.no_grad():
        torch.testing.assert_close(text_logprobs(load_backend(moved)), expected, atol=1e-5, rtol=0)


def test_a_shipped_adapter_is_copied_under_tars_home_once_and_again_when_it_changes(trained, tmp_path, monkeypatch):
    base, adapter, expected = trained
    assets = tmp_path / "assets"
    shutil.copytree(adapter, assets / "ship")
    meta = json.loads((assets / "ship" / ADAPTER_CONFIG).read_text())
    del meta["base_model_path"]  # what a shipped adapter holds: the base by name only
    (assets / "ship" / ADAPTER_CONFIG).write_text(json.dumps(meta))
    monkeypatch.setattr(mini, "ASSETS", assets)
    monkeypatch.setattr(mini, "SHIPPED_ADAPTERS", {"x": "ship"})
    logs = []
    out = mini.shipped_model("mini:x", log=logs.append)
    assert out == mini.mini_dir("x") and (out / ADAPTER_WEIGHTS).exists() and len(logs) == 1
    mini.shipped_model("mini:x", log=logs.append)
    assert len(logs) == 1  # already there
    with torch.no_grad():
        torch.testing.assert_close(text_logprobs(load_backend("mini:x")), expected, atol=1e-5, rtol=0)
    meta["steps"] = 4
    (assets / "ship" / ADAPTER_CONFIG).write_text(json.dumps(meta))
    mini.shipped_model("mini:x", log=logs.append)
    assert len(logs) == 2 and json.loads((out / ADAPTER_CONFIG).read_text())["steps"] == 4


def test_the_adapter_shipped_with_tars_is_complete():
    for folder in mini.SHIPPED_ADAPTERS.values():
        meta = json.loads((mini.ASSETS / folder / ADAPTER_CONFIG).read_text())
        assert meta["format"] == "tars-lora" and "base_model_path" not in meta
        assert meta["base_model"][len("mini:"):] in mini.SHIPPED_STAGES
        assert {"command", "config", "tars_commit_at_export"} <= set(meta["provenance"])
        from safetensors.torch import load_file

        weights = load_file(str(mini.ASSETS / folder / ADAPTER_WEIGHTS))
        assert {k.rsplit(".lora_", 1)[0] for k in weights} == set(meta["target_modules"])
        assert all(v.shape[0 if ".lora_A." in k else 1] == meta["r"] for k, v in weights.items())


def test_export_adapter_keeps_the_weights_drops_the_local_path_and_records_how(trained, tmp_path):
    from tars.models.lora import export_adapter

    _, adapter, expected = trained
    run = tmp_path / "run"
    shutil.copytree(adapter, run / "adapter")
    (run / "config.yaml").write_text("model: mini:soft\nmethod: tars\nsteps: 3\n")
    (run / "eval").mkdir()
    (run / "eval" / "metrics.json").write_text(json.dumps({"datasets": {"mini:test": {
        "speech": {"n": 500, "accuracy": 36.8, "subjects": {}}, "text": {"n": 500, "accuracy": 68.4}, "gap": 31.6}}}))
    out = export_adapter(run, tmp_path / "shipped", command="tars train …")
    meta = json.loads((out / ADAPTER_CONFIG).read_text())
    assert "base_model_path" not in meta and meta["steps"] == 3
    prov = meta["provenance"]
    assert prov["command"] == "tars train …" and prov["config"] == {"model": "mini:soft", "method": "tars", "steps": 3}
    assert prov["evaluation"] == {"datasets": {"mini:test": {"speech": {"accuracy": 36.8, "n": 500},
                                                             "text": {"accuracy": 68.4, "n": 500}}}}
    assert (out / ADAPTER_WEIGHTS).read_bytes() == (adapter / ADAPTER_WEIGHTS).read_bytes()
    with pytest.raises(UserError, match="no finished adapter"):
        export_adapter(tmp_path / "nothing", tmp_path / "x", command="c")


@pytest.mark.parametrize("damage", ["json", "field", "weights", "mismatch", "base"])
def test_a_broken_adapter_folder_is_a_one_line_error_naming_the_file(trained, tmp_path, damage):
    _, adapter, _ = trained
    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    meta = json.loads((bad / ADAPTER_CONFIG).read_text())
    if damage == "json":
        (bad / ADAPTER_CONFIG).write_text("{not json")
    elif damage == "field":
        del meta["r"]
        (bad / ADAPTER_CONFIG).write_text(json.dumps(meta))
    elif damage == "weights":
        (bad / ADAPTER_WEIGHTS).unlink()
    elif damage == "base":  # copied to a machine without its base model
        meta["base_model"] = meta["base_model_path"] = str(tmp_path / "gone" / "model")
        (bad / ADAPTER_CONFIG).write_text(json.dumps(meta))
    else:
        meta["target_modules"] = meta["target_modules"][:3]
        (bad / ADAPTER_CONFIG).write_text(json.dumps(meta))
    expect = {"json": "not valid JSON", "field": "missing field 'r'", "weights": "adapter weights not found",
              "mismatch": "do not match", "base": f"{ADAPTER_CONFIG}: its base model .* is not on this machine"}[damage]
    with pytest.raises(UserError, match=expect):
        load_backend(bad)
    if damage == "json":  # as a user sees it
        data = write_jsonl(tmp_path / "q.jsonl", [good_row()])
        r = run_cli("eval", "--model", bad, "--data", data, "--out", tmp_path / "o")
        assert r.returncode != 0 and "Traceback" not in r.stderr and ADAPTER_CONFIG in r.stderr
