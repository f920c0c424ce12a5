"""Loading the configuration: YAML plus ``a.b=c`` overrides, type checks, and ``--help``.

Loading validates types and choices against the schema's annotations and fails with the
dotted field name, the value given and what was expected; :func:`field_docs` reads the
attribute docstrings back from the schema's source so that ``--help`` can print them.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import inspect
import os
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from r2d.config.schema import Config, ConfigError, _require

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} fields"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _coerce(tp: Any, value: Any, name: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted where lossless."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        _require(value in typing.get_args(tp), name, value, _type_name(tp))
        return value
    if origin is list:
        _require(isinstance(value, list), name, value, _type_name(tp))
        (item_tp,) = typing.get_args(tp)
        return [_coerce(item_tp, v, f"{name}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        _require(isinstance(value, dict), name, value, _type_name(tp))
        return _build(tp, value, name)
    if tp is bool:
        _require(isinstance(value, bool), name, value, _type_name(tp))
    elif tp is int:
        _require(isinstance(value, int) and not isinstance(value, bool), name, value, _type_name(tp))
    elif tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-3" (no dot) as a string; it is unambiguous as a number.
            try:
                value = float(value)
            except ValueError:
                pass
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), name, value, _type_name(tp))
        return float(value)
    elif tp is str:
        _require(isinstance(value, str), name, value, _type_name(tp))
    return value


def _build(cls: type, data: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown key, expected one of {sorted(names)}")
    kwargs = {}
    defaults = {f.name: f.default_factory for f in dataclasses.fields(cls)
                if f.default_factory is not dataclasses.MISSING}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict) and key in defaults:
            # A mapping that names some keys keeps the field's own default for the others: the guard's
            # source stays Llama Guard when only its dtype is set, not the plain ModelConfig's model.
            value = merge(dataclasses.asdict(defaults[key]()), value, dotted)
        kwargs[key] = _coerce(hints[key], value, dotted)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        # __post_init__ knows only the field's own name: prefix it with the path.
        raise ConfigError(f"{prefix}.{err}" if prefix else str(err)) from None


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node: Any = tree
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            # An index into a list the YAML already has: data.sources.0.path=...
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"{dotted}: {key!r} is not an index of the {len(node)} items at "
                                  f"{'.'.join(keys[:i])}")
            key = int(key)
        elif not isinstance(node, dict):
            raise ConfigError(f"{dotted}: cannot set a key below {keys[i - 1]!r}, which is not a mapping")
        if last:
            node[key] = value
        else:
            if isinstance(node, dict):
                node = node.setdefault(key, {})
            else:
                node = node[key]


def merge(base: Any, over: Any, where: str = "") -> Any:
    """``over`` laid onto ``base``: mappings merge key by key; a mapping of indices updates list items.

    So an override file changes only what it names: ``distill: {engine: {num_gpus: 0}}`` keeps the
    engine's other keys, and ``data: {sources: {0: {path: ...}}}`` changes the first source's path.
    """
    if isinstance(over, dict) and isinstance(base, list):
        out = list(base)
        for key, value in over.items():
            if not isinstance(key, int) or not 0 <= key < len(base):
                raise ConfigError(f"{where}.{key}: not an index of the {len(base)} items of {where or 'the list'}")
            out[key] = merge(base[key], value, f"{where}.{key}")
        return out
    if isinstance(over, dict) and isinstance(base, dict):
        out = dict(base)
        for key, value in over.items():
            out[key] = merge(base[key], value, f"{where}.{key}".lstrip(".")) if key in base else value
        return out
    return over


_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def read_yaml(path: str | Path) -> dict:
    """One config file as a mapping, with ``${NAME}`` replaced by the environment variable NAME.

    Raises:
        ConfigError: the file is missing, not YAML, not a mapping, or names an unset variable.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    text = p.read_text()
    unset = sorted({name for name in _ENV_RE.findall(text) if name not in os.environ})
    if unset:
        raise ConfigError(f"config file {str(p)!r}: environment variable {unset[0]} is not set (used as ${{{unset[0]}}})")
    try:
        tree = yaml.safe_load(_ENV_RE.sub(lambda m: os.environ[m.group(1)], text)) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {str(p)!r}: expected a mapping at the top level")
    return tree


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``a.b=c`` and parse ``c`` as YAML (so numbers, booleans and lists keep their type)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. train.max_steps=10")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: str | Path | list | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults), lay any further files over it, and apply ``a.b=c`` overrides.

    Args:
        path: one file, or several: each later file changes only the keys it names (:func:`merge`),
            as ``--config recipe.yaml --config rehearse.yaml`` does.
        overrides: dotted ``key=value`` strings, applied last.

    Raises:
        ConfigError: naming the dotted field, the value and what was expected.
    """
    paths = [] if path is None else [path] if isinstance(path, (str, Path)) else list(path)
    tree: dict = {}
    for p in paths:
        tree = merge(tree, read_yaml(p)) if tree else read_yaml(p)
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    return _build(Config, tree, "")


# ---------------------------------------------------------------- help

def field_docs(cls: type = Config, prefix: str = "") -> dict[str, str]:
    """Map dotted field names to their attribute docstrings (read from the source)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                docs[node.target.id] = str(nxt.value.value)
    out: dict[str, str] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        dotted = f"{prefix}{f.name}"
        out[dotted] = docs.get(f.name, "")
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(field_docs(hints[f.name], dotted + "."))
    return out


def help_text() -> str:
    """One line per field: ``dotted.name  (default)  docstring``."""
    defaults = flatten(Config().to_dict())
    lines = []
    for name, doc in field_docs().items():
        if name in defaults:
            lines.append(f"  {name} = {defaults[name]!r}\n      {doc}")
    return "\n".join(lines)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of dotted keys (for MLflow params and --help)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@contextlib.contextmanager
def exit_on_config_error(prog: str):
    """Inside it, a :class:`ConfigError` prints one line, ``PROG: error: ...``, and exits with status 2.

    For entry points: a bad config, or a setting found wrong only once a stage reads what it points
    at (a traces folder made under other settings), is a usage error; a traceback would bury the line.
    """
    import sys

    try:
        yield
    except ConfigError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def load_config_or_exit(path: str | Path | None, overrides: list[str] | None, prog: str) -> Config:
    """:func:`load_config` for entry points: a bad config prints one line and exits with status 2.

    The line names the dotted field, the value and what was expected; status 2 is what argparse
    uses for bad usage (:func:`exit_on_config_error`).
    """
    with exit_on_config_error(prog):
        return load_config(path, overrides)


def parse_job_args(argv: list[str] | None, description: str) -> tuple[Config, list[str]]:
    """Shared job CLI: ``--config FILE`` plus ``key=value`` overrides; ``--help`` lists every field.

    A bad config exits with status 2 and one line naming the field (:func:`load_config_or_exit`).
    """
    import argparse

    parser = argparse.ArgumentParser(description=description, epilog="config fields:\n" + help_text(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=None,
                        help="YAML config file (defaults when omitted); repeat to lay an override file over it")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=10")
    args, rest = parser.parse_known_args(argv)
    return load_config_or_exit(args.config, args.overrides, parser.prog), rest

