"""The configuration reference (docs/configuration.md), generated from tasks/config.py.

    python -m tasks.config_reference            # (re)write docs/configuration.md
    python -m tasks.config_reference --check    # exit 1 when docs/configuration.md is stale
    python -m tasks.config_reference --print    # write the reference to stdout

Types, defaults and bounds come from the pydantic models; the meaning of each key is the
`#` comment block directly above its field in tasks/config.py (read with `ast` and
`tokenize`, since pydantic never sees comments); the cross-field rules are the `raise
ValueError(...)` statements of the models' validators. A field with no comment is an error,
so a new key cannot be added without saying what it does.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import io
import sys
import tokenize
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from engine.core import collector as core_gc
from engine.core import step_trace
from tasks import config as config_module
from tasks import front_trace, worker
from tasks.config import DeploymentConfig

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "docs" / "configuration.md"
COMMAND = "python -m tasks.config_reference"

# Keys allowed without a comment in tasks/config.py (rendered with a placeholder); every
# other key must have one, or generation fails. Empty: every key is documented.
UNDOCUMENTED_ALLOWED: frozenset[str] = frozenset()
NO_COMMENT = "*(No comment above this field in tasks/config.py yet.)*"

# Meanings of the environment variables; their names come from tasks/config.py.
ENVIRONMENT = (
    (
        config_module.CONFIG_ENV,
        "Path of the deployment YAML file, used when no `--config` is given. Unset: the"
        " built-in defaults (the CPU demo, the same as configs/default.yaml).",
    ),
    (
        config_module.REDIS_URL_ENV,
        "When set, replaces `redis.url` of whichever configuration was loaded.",
    ),
    (
        worker.GIL_SWITCH_ENV,
        f"A worker's GIL switch interval in milliseconds (default"
        f" {worker.GIL_SWITCH_INTERVAL_S * 1000:g}; CPython's own is 5): how long a thread"
        " running Python code keeps the GIL while a thread woken by its socket waits.",
    ),
    (
        core_gc.GC_ENV,
        "`auto`: an engine rank process collects its oldest generation of garbage when"
        " CPython's counts say, not after steps without high work (the default, `steps`;"
        " engine/core/collector.py).",
    ),
    (
        step_trace.TRACE_ENV,
        "A directory: every engine core writes one JSON line a step to `steps-<pid>.jsonl`"
        " there (bench/step_trace_summary.py reads it). Set only while looking.",
    ),
    (
        front_trace.TRACE_ENV,
        "A directory: every worker writes one JSON line per high message (started, handed to"
        " the engine) to `front-<pid>.jsonl` there. Set only while looking.",
    ),
)


class UndocumentedField(Exception):
    """A config field without a `#` comment above it in tasks/config.py."""


@dataclass(frozen=True)
class Key:
    name: str  # dotted: "redis.lease_s"
    type: str
    default: str
    allowed: str
    meaning: str


@dataclass(frozen=True)
class Rule:
    key: str
    message: str
    condition: str


# --- reading tasks/config.py ---------------------------------------------------------------


def _source(module: types.ModuleType = config_module) -> str:
    assert module.__file__ is not None
    return Path(module.__file__).read_text()


def _comment_lines(source: str) -> dict[int, str]:
    """Line number -> text of every line that holds only a comment."""
    comments: dict[int, str] = {}
    code_lines: set[int] = set()
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string
        elif tok.type not in skip and tok.type != tokenize.ENDMARKER:
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    return {
        line: text.removeprefix("#").strip()
        for line, text in comments.items()
        if line not in code_lines
    }


def field_comments(source: str) -> dict[str, dict[str, str]]:
    """Class name -> field name -> the comment block directly above the field (joined)."""
    comments = _comment_lines(source)
    result: dict[str, dict[str, str]] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields: dict[str, str] = {}
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            block: list[str] = []
            line = stmt.lineno - 1
            while line in comments:
                block.insert(0, comments[line])
                line -= 1
            if block:
                fields[stmt.target.id] = " ".join(part for part in block if part)
        result[node.name] = fields
    return result


def _value_error_message(node: ast.expr) -> str | None:
    if not (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "ValueError"
        and node.args
    ):
        return None
    arg = node.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr):
        parts = []
        for value in arg.values:
            if isinstance(value, ast.Constant):
                parts.append(str(value.value))
            elif isinstance(value, ast.FormattedValue):
                parts.append("<" + ast.unparse(value.value).removeprefix("self.") + ">")
        return "".join(parts)
    return None


def validator_rules(source: str, prefixes: dict[str, str]) -> list[Rule]:
    """The `if COND: raise ValueError("key: why")` checks in the classes' validators.

    `prefixes` maps a class name to where its keys sit ("limits." for LimitSettings).
    """
    rules: list[Rule] = []
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.ClassDef) and node.name in prefixes):
            continue
        for func in node.body:
            if not isinstance(func, ast.FunctionDef):
                continue
            decorators = [ast.unparse(d) for d in func.decorator_list]
            if not any(d.startswith("model_validator") for d in decorators):
                continue
            for stmt in ast.walk(func):
                if not isinstance(stmt, ast.If):
                    continue
                for inner in stmt.body:
                    if not (isinstance(inner, ast.Raise) and inner.exc is not None):
                        continue
                    message = _value_error_message(inner.exc)
                    if message is None:
                        continue
                    key, _, why = message.partition(": ")
                    condition = ast.unparse(stmt.test).replace("self.", "")
                    rules.append(Rule(prefixes[node.name] + key, why, condition))
    return rules


# --- the models ----------------------------------------------------------------------------


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "str" if all(isinstance(a, str) for a in typing.get_args(annotation)) else "literal"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def _literal_values(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        values: tuple[Any, ...] = ()
        for arg in typing.get_args(annotation):
            values += _literal_values(arg)
        return values
    return ()


def _allowed(name: str, info: FieldInfo) -> str:
    parts: list[str] = []
    literals = _literal_values(info.annotation)
    if literals:
        parts.append("one of " + ", ".join(f"`{_yaml_value(v)}`" for v in literals))
    bounds = (
        (annotated_types.Gt, "gt", ">"),
        (annotated_types.Ge, "ge", "≥"),
        (annotated_types.Lt, "lt", "<"),
        (annotated_types.Le, "le", "≤"),
    )
    for meta in info.metadata:
        for kind, attr, symbol in bounds:
            if isinstance(meta, kind):
                parts.append(f"{symbol} {getattr(meta, attr)}")
    if name == "model_shard_strategy":
        aliases = getattr(config_module, "_SHARD_ALIASES", {})
        if aliases:
            parts.append(
                "also accepted: "
                + ", ".join(f"`{a}` (= `{t}`)" for a, t in sorted(aliases.items()))
            )
    if typing.get_origin(info.annotation) in (typing.Union, types.UnionType) and type(
        None
    ) in typing.get_args(info.annotation):
        parts.append("`null`")
    if info.annotation is bool:
        parts.append("`true`, `false`")
    return "; ".join(parts) if parts else f"any {_type_name(info.annotation)}"


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def sections(root: type[BaseModel] = DeploymentConfig) -> list[tuple[str, type[BaseModel]]]:
    """("", DeploymentConfig) then each nested settings model with its key prefix."""
    found: list[tuple[str, type[BaseModel]]] = [("", root)]
    for name, info in root.model_fields.items():
        if _is_model(info.annotation):
            assert isinstance(info.annotation, type)
            found.append((name + ".", info.annotation))
    return found


def collect_keys(
    source: str | None = None, allowed_missing: frozenset[str] = UNDOCUMENTED_ALLOWED
) -> list[Key]:
    """Every leaf key of the deployment config, in the order of tasks/config.py.

    Raises UndocumentedField when a key has no comment and is not in `allowed_missing`.
    """
    comments = field_comments(_source() if source is None else source)
    keys: list[Key] = []
    missing: list[str] = []
    for prefix, model in sections():
        for name, info in model.model_fields.items():
            if _is_model(info.annotation):
                continue
            dotted = prefix + name
            meaning = comments.get(model.__name__, {}).get(name)
            if meaning is None:
                if dotted not in allowed_missing:
                    missing.append(dotted)
                meaning = NO_COMMENT
            keys.append(
                Key(
                    name=dotted,
                    type=_type_name(info.annotation),
                    default=_yaml_value(info.default),
                    allowed=_allowed(name, info),
                    meaning=meaning,
                )
            )
    if missing:
        raise UndocumentedField(
            "no `#` comment above these fields in tasks/config.py (say what each key does): "
            + ", ".join(missing)
        )
    return keys


# --- rendering -----------------------------------------------------------------------------


def render(source: str | None = None) -> str:
    text = _source() if source is None else source
    keys = collect_keys(text)
    rules = validator_rules(text, {model.__name__: prefix for prefix, model in sections()})
    strict = DeploymentConfig.model_config.get("extra") == "forbid"

    out: list[str] = [
        "# Configuration reference",
        "",
        f"<!-- Generated by `{COMMAND}` from tasks/config.py; do not edit by hand. -->",
        "",
        "One YAML file describes a deployment; it is chosen by `--config FILE`, else by the"
        f" environment variable `{config_module.CONFIG_ENV}`, else the built-in defaults are"
        " used (the CPU demo, the same as configs/default.yaml). Nested keys are written as"
        " sections in the YAML (`redis:` then `  lease_s: 30`); below they are dotted"
        " (`redis.lease_s`).",
        "",
    ]
    if strict:
        out += ["An unknown or misspelled key is an error, not a silently ignored setting.", ""]
    out += ["## Summary", "", "| Key | Type | Default | Allowed |", "|---|---|---|---|"]
    for key in keys:
        cells = (f"`{key.name}`", f"`{key.type}`", f"`{key.default}`", key.allowed)
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    out.append("")

    for prefix, _model in sections():
        title = "Top-level keys" if not prefix else f"`{prefix.rstrip('.')}`"
        out += [f"## {title}", ""]
        for key in keys:
            if key.name.startswith(prefix) and (prefix or "." not in key.name):
                out += [
                    f"### `{key.name}`",
                    "",
                    f"- Type: `{key.type}`",
                    f"- Default: `{key.default}`",
                    f"- Allowed: {key.allowed}",
                    "",
                    key.meaning,
                    "",
                ]

    out += [
        "## Rules across keys",
        "",
        "Checked when the file is loaded; the error names the file, then the key and the rule.",
        "",
    ]
    for rule in rules:
        out.append(f"- `{rule.key}`: {rule.message} (fails when `{rule.condition}`)")
    out.append("")

    out += ["## Environment variables", "", "| Variable | Meaning |", "|---|---|"]
    for name, meaning in ENVIRONMENT:
        out.append(f"| `{name}` | {meaning} |")
    out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    mode.add_argument("--print", action="store_true", help="write the reference to stdout")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="default: %(default)s")
    args = parser.parse_args(argv)
    try:
        text = render()
    except UndocumentedField as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.print:
        sys.stdout.write(text)
        return 0
    current = args.output.read_text() if args.output.exists() else ""
    if args.check:
        if current == text:
            return 0
        sys.stdout.writelines(
            difflib.unified_diff(
                current.splitlines(keepends=True),
                text.splitlines(keepends=True),
                f"{args.output} (committed)",
                f"{args.output} (generated)",
            )
        )
        print(f"{args.output} is stale: run `{COMMAND}` to regenerate it.", file=sys.stderr)
        return 1
    if current != text:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
