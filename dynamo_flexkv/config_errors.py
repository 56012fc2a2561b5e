"""How a settings problem becomes one line: `<setting as the user wrote it>=<value> is invalid: <why>`.

Validators in config.py raise `UseAllowed` ("say what this field allows") or `Problems` (cross-field
findings); `validation_error_lines` turns pydantic's ValidationError into those lines, spelling every
setting the way its source did (env var, file key, `kv_connector_extra_config.<key>`). The functions
take the model's fields as an argument, so this module needs nothing of config.py.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

from pydantic import ValidationError

from dynamo_flexkv.config_sources import DIRECT, Source, suggest


class UseAllowed(ValueError):
    """Raised by a validator to say "report this field's documented allowed values"."""


class Problem(NamedTuple):
    field: str
    reason: str  # ``{other_field}`` in it is spelled as the user spelled ``field`` (env var / key)
    value: Any


class Problems(ValueError):
    """Cross-field problems found by the model validator."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("; ".join(f"{p.field}: {p.reason}" for p in problems))


def literal_values(annotation: Any) -> tuple[str, ...]:
    if typing.get_origin(annotation) is Literal:
        return tuple(str(v) for v in typing.get_args(annotation))
    return ()


def allowed_text(info: Any) -> str:
    """What a field (pydantic FieldInfo) allows, as the docs' table and the errors say it."""
    literal = literal_values(info.annotation)
    if literal:
        return ", ".join(literal) + " (case-insensitive)"
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    if "x-allowed" in extra:
        return str(extra["x-allowed"])
    if info.annotation is bool:
        return "true or false (also 1/0, yes/no, on/off)"
    return ""


def _expected(info: Any) -> str:
    literal = literal_values(info.annotation)
    if literal:
        return "allowed values are " + ", ".join(literal)
    return "expected " + allowed_text(info)


def problem_line(field: str, reason: str, value: Any, origins: Mapping[str, Source],
                 setting_names: Sequence[str]) -> str:
    """``<setting as written>=<value> is invalid: <reason>``, ``{other}`` in `reason` spelled the same way."""
    source = origins.get(field, DIRECT)
    for name in setting_names:
        reason = reason.replace("{" + name + "}", source.name(name))
    return f"{source.describe(field, value)} is invalid: {reason}"


def validation_error_lines(exc: ValidationError, raw: Mapping[str, Any], origins: Mapping[str, Source],
                           fields: Mapping[str, Any]) -> list[str]:
    """One line per problem in `exc`, a setting reported once; `fields` is the model's `model_fields`."""
    names = tuple(fields)
    lines: list[str] = []
    seen: set[str] = set()

    def add(field: str, reason: str, value: Any) -> None:
        if field not in seen:
            seen.add(field)
            lines.append(problem_line(field, reason, value, origins, names))

    for err in exc.errors(include_url=False):
        loc = err.get("loc") or ()
        field = loc[0] if loc and isinstance(loc[0], str) else None
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, Problems):
            for problem in cause.problems:
                add(problem.field, problem.reason, raw.get(problem.field, problem.value))
            continue
        if field is None or field not in fields:
            if err.get("type") == "extra_forbidden":
                lines.append(f"unknown setting {field!r}{suggest(field, names)} "
                             f"(allowed settings are {', '.join(names)})")
            else:
                lines.append(err.get("msg", str(err)))
            continue
        if isinstance(cause, ValueError) and not isinstance(cause, UseAllowed):
            reason = str(cause)
        else:
            reason = _expected(fields[field])
        add(field, reason, raw.get(field, err.get("input")))
    return lines
