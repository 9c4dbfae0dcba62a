"""The machinery under config.py: YAML 1.2 parsing, `section.key=value` overrides, and typed
dataclass filling with did-you-mean errors. Nothing here knows the config's fields.

    raw = load_yaml(open("recipe.yaml"))             # dict; `no` stays the string "no"
    apply_overrides(raw, ["optim.max_lr=0.02"])       # raw["optim"]["max_lr"] == 0.02
    cfg = from_dict(Config, raw)                      # unknown keys / wrong types: UserError
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing

import yaml

from shardtrain.errors import UserError


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans: only true/false. YAML 1.1 also reads yes/no/on/off as
    booleans, which would turn `precision: no` (or `train.precision=no`) into False."""


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def load_yaml(text):
    """Parse YAML text (or an open file) safely, with YAML 1.2 booleans."""
    return yaml.load(text, Loader=_YamlLoader)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set `section.key=value` items into the nested dict `raw` (in place; returned)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or "." not in key:
            raise UserError(f"override {item!r} must look like section.key=value")
        section, name = key.split(".", 1)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise UserError(f"{section} is not a config section")
        raw[section][name] = parse_value(text)
    return raw


def parse_value(text: str):
    """`3` -> 3, `0.1` -> 0.1, `true` -> True, `[64,128]` -> list, `a,b` -> ['a', 'b']."""
    try:
        value = load_yaml(text)
    except yaml.YAMLError:
        value = text
    if isinstance(value, str) and "," in value:
        value = [load_yaml(v) for v in value.split(",")]
    return "" if value is None else value


def from_dict(cls, raw: dict, prefix: str = ""):
    """Build dataclass `cls` from a dict, checking every key and type."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            full = f"{prefix}{key}"
            known = [f"{prefix}{k}" for k in fields]
            raise UserError(f"unknown config key {full!r}{closest(full, known)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise UserError(f"{prefix}{key} must be a section (mapping), got {value!r}")
            kwargs[key] = from_dict(hint, value, prefix=f"{prefix}{key}.")
        else:
            kwargs[key] = coerce(f"{prefix}{key}", value, hint)
    return cls(**kwargs)


def coerce(key: str, value, hint):
    """Check `value` against a field type (int, float, bool, str, list[...]); int -> float ok."""
    origin = typing.get_origin(hint)
    if origin is list:
        (item_type,) = typing.get_args(hint)
        items = value if isinstance(value, list) else [value]
        return [coerce(key, v, item_type) for v in items]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads `5e-4` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise UserError(f"{key} must be {hint.__name__}, got {value!r}")
    return value


def check_choice(key: str, value: str, choices: list[str]) -> None:
    if value not in choices:
        hint = closest(value, choices)
        raise UserError(f"{key} must be one of {', '.join(choices)}; got {value!r}{hint}")


def closest(word: str, choices: list[str]) -> str:
    match = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def flatten(d: dict, prefix: str = "") -> dict:
    """{'optim': {'max_lr': 0.1}} -> {'optim.max_lr': 0.1}."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
