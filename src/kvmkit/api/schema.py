"""kvmkit's own OpenAPI (swagger 2.0) spec, shipped as package data, and a validator for the
subset of JSON Schema it uses (type, required, properties, additionalProperties, enum,
minimum/maximum, maxLength, pattern, items/maxItems, $ref).

Every request body and every config-file section goes through `validate` before it reaches
the action layer, so the REST API, the config file and the Python API accept exactly the
same shapes: unknown fields, wrong types, missing required fields and values out of range are
refused with one message in serde_json's words (Firecracker's) naming where the field is.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any


class SchemaError(ValueError):
    """A value that does not match the schema; the message names the field."""


@functools.cache
def spec() -> dict[str, Any]:
    # Imported here: importlib.resources brings tempfile, shutil and the compressors, which the
    # API's start-up does not need (bench/startup.py).
    from importlib import resources

    text = resources.files("kvmkit.api").joinpath("openapi.json").read_text()
    data: dict[str, Any] = json.loads(text)
    return data


def definition(name: str) -> dict[str, Any]:
    d: dict[str, Any] = spec()["definitions"][name]
    return d


def _resolve(schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    return definition(ref.rsplit("/", 1)[1])


_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,), "array": (list,), "string": (str,), "boolean": (bool,),
    "integer": (int,), "number": (int, float),
}  # fmt: skip


def _at(where: str) -> str:
    return f" at {where}" if where else ""


def _shown(value: Any) -> str:
    """A value as serde_json names it in its errors (`invalid type: string "x"`)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean `{'true' if value else 'false'}`"
    if isinstance(value, int):
        return f"integer `{value}`"
    if isinstance(value, float):
        return f"floating point `{value}`"
    if isinstance(value, str):
        return f"string {json.dumps(value[:80])}"
    if isinstance(value, list):
        return "sequence"
    return "map"


def _ticks(names: Any) -> str:
    return ", ".join(f"`{n}`" for n in names)


def validate(value: Any, schema: dict[str, Any] | str, where: str = "") -> None:
    """Raise SchemaError unless `value` matches `schema` (a definition name or a schema).

    Messages use serde_json's words, as Firecracker's answers carry them after "An error
    occurred when deserializing the json body of a request: " (`missing field `x``,
    `unknown field `x``, `invalid type: ...`, `unknown variant ...`), followed by where in
    the body (`at drives[0].rate_limiter.bandwidth`) instead of serde's line and column."""
    if isinstance(schema, str):
        schema = definition(schema)
    schema = _resolve(schema)
    kind = schema.get("type")
    if kind is not None:
        ok = isinstance(value, _TYPES[kind])
        if kind in ("integer", "number") and isinstance(value, bool):
            ok = False
        if not ok:
            raise SchemaError(f"invalid type: {_shown(value)}, expected {kind}{_at(where)}")
    if "enum" in schema and value not in schema["enum"]:
        raise SchemaError(
            f"unknown variant `{value}`, expected one of {_ticks(schema['enum'])}{_at(where)}"
        )
    if isinstance(value, int) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            raise SchemaError(
                f"invalid value: {_shown(value)}, expected at least {schema['minimum']}"
                f"{_at(where)}"
            )
        if "maximum" in schema and value > schema["maximum"]:
            raise SchemaError(
                f"invalid value: {_shown(value)}, expected at most {schema['maximum']}"
                f"{_at(where)}"
            )
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            raise SchemaError(
                f"invalid value: {_shown(value)}, expected a non-empty string{_at(where)}"
            )
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            raise SchemaError(
                f"invalid length {len(value)}, expected a string of at most "
                f"{schema['maxLength']} characters{_at(where)}"
            )
        if "pattern" in schema and not re.search(schema["pattern"], value):
            raise SchemaError(
                f"invalid value: {_shown(value)}, expected a string matching "
                f"{schema['pattern']}{_at(where)}"
            )
    if isinstance(value, list):
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            raise SchemaError(
                f"invalid length {len(value)}, expected at most {schema['maxItems']} items"
                f"{_at(where)}"
            )
        if "items" in schema:
            for i, item in enumerate(value):
                validate(item, schema["items"], f"{where}[{i}]")
    if isinstance(value, dict):
        props: dict[str, Any] = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                raise SchemaError(f"missing field `{name}`{_at(where)}")
        extra = schema.get("additionalProperties", True)
        for name, item in value.items():
            sub = f"{where}.{name}" if where else name
            if name in props:
                validate(item, props[name], sub)
            elif extra is False:
                raise SchemaError(
                    f"unknown field `{name}`, expected one of {_ticks(props)}{_at(where)}"
                )
            elif isinstance(extra, dict):
                validate(item, extra, sub)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"
