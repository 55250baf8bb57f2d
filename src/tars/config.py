"""Typed configs: a YAML file plus `key=value` overrides, validated on load, saved beside every run.

torchtune-style: `tars <stage> --config configs/x.yaml lr=1e-4 data.n=500`. Dotted keys reach nested
sections; values are parsed as YAML scalars (`1e-4`, `true`, `[1, 2]`). Unknown keys and wrong types are
rejected with one line naming the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from tars import __version__
from tars.atomic import atomic_write_text
from tars.errors import UserError

C = TypeVar("C", bound="Config")


class Config(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        if not key:
            raise UserError(f"override {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` as a string; users mean a number
            try:
                value = float(value) if any(c in value for c in ".eE") else int(value)
            except ValueError:
                pass
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"override {item!r}: {p} is not a section")
        node[parts[-1]] = value
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def yaml_error_place(path: Path, e: yaml.YAMLError) -> str:
    """`path:line` where PyYAML marks the problem (`path` alone when it marks none)."""
    mark = getattr(e, "problem_mark", None)
    return f"{path}:{mark.line + 1}" if mark is not None else str(path)


def yaml_problem(e: yaml.YAMLError) -> str:
    """The problem itself ("mapping values are not allowed here"), not PyYAML's context lines."""
    return getattr(e, "problem", None) or str(e).splitlines()[0]


def load_config(cls: type[C], path: str | Path | None, overrides: list[str] | None = None) -> C:
    """Read `path` (YAML) into `cls`, apply overrides, validate; errors name the file and the key."""
    data: dict[str, Any] = {}
    where = "config"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.exists():
            raise UserError(f"{path}: config file not found")
        if not path.is_file():
            raise UserError(f"{path}: a folder, not a config file (give its YAML file)")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except UnicodeDecodeError:
            raise UserError(f"{path}: not a text file (expected YAML)") from None
        except yaml.YAMLError as e:
            raise UserError(f"{yaml_error_place(path, e)}: not valid YAML ({yaml_problem(e)})") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: expected a mapping of keys to values at the top level")
        data.pop("tars_version", None)
        data.pop("versions", None)
    data = _merge(data, parse_overrides(overrides or []))
    return validate(cls, data, where)


def validate(cls: type[C], data: dict[str, Any], where: str = "config") -> C:
    """`cls.model_validate(data)` with the first problem as a one-line `UserError` naming the key."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        more = f" (and {len(e.errors()) - 1} more problem(s))" if len(e.errors()) > 1 else ""
        raise UserError(f"{where}: {key}: {msg}{more}") from None


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"tars": __version__, "python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "accelerate", "sentence-transformers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def save_config(cfg: Config, run_dir: Path, name: str = "config.yaml") -> Path:
    """The resolved config with the package versions, so the run can be repeated exactly."""
    data = json.loads(cfg.model_dump_json())
    data["versions"] = versions()
    path = Path(run_dir) / name
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
    return path
