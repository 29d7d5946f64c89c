"""kvmkit's own OpenAPI (swagger 2.0) spec, shipped as package data, and a validator for the
subset of JSON Schema it uses (type, required, properties, additionalProperties, enum,
minimum/maximum, maxLength, pattern, items/maxItems, $ref).

Every request body and every config-file section goes through `validate` before it reaches
the action layer, so the REST API, the config file and the Python API accept exactly the
same shapes: unknown fields, wrong types, missing required fields and values out of range are
refused with one message naming the field.
"""

from __future__ import annotations

import functools
import json
import re
from importlib import resources
from typing import Any


class SchemaError(ValueError):
    """A value that does not match the schema; the message names the field."""


@functools.cache
def spec() -> dict[str, Any]:
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


def validate(value: Any, schema: dict[str, Any] | str, where: str = "") -> None:
    """Raise SchemaError unless `value` matches `schema` (a definition name or a schema)."""
    if isinstance(schema, str):
        where = where or schema
        schema = definition(schema)
    schema = _resolve(schema)
    kind = schema.get("type")
    if kind is not None:
        ok = isinstance(value, _TYPES[kind])
        if kind in ("integer", "number") and isinstance(value, bool):
            ok = False
        if not ok:
            raise SchemaError(f"{where or 'body'}: expected {kind}, got {_json_type(value)}")
    if "enum" in schema and value not in schema["enum"]:
        allowed = ", ".join(str(v) for v in schema["enum"])
        raise SchemaError(f"{where}: {value!r} is not one of: {allowed}")
    if isinstance(value, int) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            raise SchemaError(f"{where}: {value} is below the minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            raise SchemaError(f"{where}: {value} is above the maximum {schema['maximum']}")
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            raise SchemaError(f"{where}: must not be empty")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            raise SchemaError(f"{where}: longer than {schema['maxLength']} characters")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            raise SchemaError(f"{where}: {value!r} does not match {schema['pattern']}")
    if isinstance(value, list):
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            raise SchemaError(f"{where}: more than {schema['maxItems']} items")
        if "items" in schema:
            for i, item in enumerate(value):
                validate(item, schema["items"], f"{where}[{i}]")
    if isinstance(value, dict):
        props: dict[str, Any] = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                raise SchemaError(f"{where}: missing required field {name!r}")
        extra = schema.get("additionalProperties", True)
        for name, item in value.items():
            sub = f"{where}.{name}" if where else name
            if name in props:
                validate(item, props[name], sub)
            elif extra is False:
                raise SchemaError(f"{where}: unknown field {name!r}")
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
