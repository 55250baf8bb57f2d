"""Typed configs: YAML + key=value overrides, rejected with one line naming the key."""

import pytest
import yaml

from tars.config import load_config, parse_overrides, save_config
from tars.errors import UserError
from tars.train.supervised import SupervisedConfig


def write(tmp_path, data):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_overrides_parse_yaml_scalars_and_dotted_keys():
    assert parse_overrides(["lr=1e-4", "data.n=5", "data.families=[facts, units]", "name=x=y"]) == {
        "lr": 1e-4, "data": {"n": 5, "families": ["facts", "units"]}, "name": "x=y"}
    with pytest.raises(UserError, match="expected key=value"):
        parse_overrides(["lr"])


def test_load_merges_file_and_overrides(tmp_path):
    p = write(tmp_path, {"model": "m", "out": "o", "lr": 0.1, "data": {"n": 10, "seed": 3}})
    cfg = load_config(SupervisedConfig, p, ["data.n=20", "batch_size=2"])
    assert (cfg.lr, cfg.batch_size, cfg.data.n, cfg.data.seed) == (0.1, 2, 20, 3)


@pytest.mark.parametrize(
    "data, overrides, message",
    [
        ({"model": "m", "out": "o", "lr_rate": 1}, [], "c.yaml: lr_rate: unknown key"),
        ({"model": "m", "out": "o"}, ["batch_size=eight"], "c.yaml: batch_size: Input should be a valid integer"),
        ({"model": "m", "out": "o"}, ["data.famlies=[x]"], "c.yaml: data.famlies: unknown key"),
        ({"out": "o"}, [], "c.yaml: model: Field required"),
        ({"model": "m", "out": "o", "modality": "video"}, [], "c.yaml: modality: Input should be 'text' or 'speech'"),
    ],
)
def test_bad_configs_name_the_key(tmp_path, data, overrides, message):
    with pytest.raises(UserError) as e:
        load_config(SupervisedConfig, write(tmp_path, data), overrides)
    assert str(e.value).startswith(str(tmp_path / message.split(":")[0]) + message[len(message.split(":")[0]):])
    assert "\n" not in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(SupervisedConfig, tmp_path / "none.yaml")
    (tmp_path / "b.yaml").write_text("a: [1,\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(SupervisedConfig, tmp_path / "b.yaml")
    (tmp_path / "l.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="expected a mapping"):
        load_config(SupervisedConfig, tmp_path / "l.yaml")
    (tmp_path / "indent.yaml").write_text("model: m\nlr: 1e-4\n  steps: 3\n")  # the line PyYAML marks
    with pytest.raises(UserError, match=r"indent\.yaml:3: not valid YAML \(mapping values are not allowed here\)"):
        load_config(SupervisedConfig, tmp_path / "indent.yaml")
    with pytest.raises(UserError, match="a folder, not a config file"):
        load_config(SupervisedConfig, tmp_path)
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00model")
    with pytest.raises(UserError, match="not a text file"):
        load_config(SupervisedConfig, tmp_path / "bin.yaml")


@pytest.mark.parametrize("cls, key, value", [
    ("tars.train.supervised:SupervisedConfig", "save_every", 0),
    ("tars.train.supervised:SupervisedConfig", "epochs", 0),
    ("tars.train.supervised:SupervisedConfig", "max_steps", -1),
    ("tars.train.ctc:CTCConfig", "batch_size", 0),
    ("tars.train.ctc:CTCConfig", "stack", 0),
    ("tars.train.kd:KDConfig", "temperature", 0),
    ("tars.train.kd:KDConfig", "val_every", 0),
    ("tars.eval.evaluate:EvalConfig", "max_new_tokens", 0),
    ("tars.eval.evaluate:EvalConfig", "limit", -3),
    ("tars.train.supervised:SupervisedConfig", "data.n", 0),
])
def test_numbers_a_stage_would_divide_by_or_loop_over_are_checked_on_load(tmp_path, cls, key, value):
    """Caught when the config is read, before data and model load (they used to end in a
    ZeroDivisionError or an IndexError after both, or, for max_steps=-1, a stage saved untrained)."""
    import importlib

    module, name = cls.split(":")
    base = {"model": "m", "out": "o"} | ({"data": ["d.jsonl"]} if name == "EvalConfig" else {})
    with pytest.raises(UserError, match=f"c.yaml: {key}: Input should be greater than"):
        load_config(getattr(importlib.import_module(module), name), write(tmp_path, base), [f"{key}={value}"])


def test_an_unknown_family_is_named_with_its_key(tmp_path):
    with pytest.raises(UserError, match="c.yaml: data.families: Value error, unknown family 'fact'; choose from"):
        load_config(SupervisedConfig, write(tmp_path, {"model": "m", "out": "o"}), ["data.families=[fact]"])


def test_saved_config_reloads_to_the_same_values(tmp_path):
    cfg = load_config(SupervisedConfig, write(tmp_path, {"model": "m", "out": "o", "lr": 0.5}), ["data.n=7"])
    path = save_config(cfg, tmp_path / "run")
    saved = yaml.safe_load(path.read_text())
    assert saved["versions"]["tars"] and saved["versions"]["torch"]
    assert load_config(SupervisedConfig, path) == cfg
