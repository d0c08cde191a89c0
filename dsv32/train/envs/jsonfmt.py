"""Answers to requests that ask for JSON (`response_format` json_object or json_schema): whether a
text is exactly one JSON object, and whether it satisfies the schema (the keywords the training
and evaluation schemas use; others are ignored)."""
from __future__ import annotations

import json
from typing import Any

TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def answer_schema(response_format: dict | None) -> dict | None:
    """The schema a JSON response_format asks the answer to satisfy ({"type": "object"} for
    json_object), or None when it asks for text (or there is none)."""
    kind = (response_format or {}).get("type")
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        return response_format["json_schema"]["schema"]
    return None


def json_answer(text: str | None, response_format: dict | None) -> Any:
    """The JSON object that `text` is, when it is exactly one object satisfying the
    response_format's schema (whitespace around it allowed); None otherwise."""
    schema = answer_schema(response_format)
    try:
        value = json.loads((text or "").strip())
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or schema is None or schema_errors(value, schema):
        return None
    return value


def schema_errors(value: Any, schema: dict, where: str = "$") -> list[str]:
    """Where `value` breaks `schema` (type, enum, const, properties, required,
    additionalProperties, items); an empty list when it satisfies it."""
    errors = _type_errors(value, schema.get("type"), where)
    if errors:
        return errors
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: not one of {schema['enum']}")
    if "const" in schema and value != schema["const"]:
        errors.append(f"{where}: not {schema['const']!r}")
    if isinstance(value, dict):
        errors += _object_errors(value, schema, where)
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            errors += schema_errors(item, schema["items"], f"{where}[{i}]")
    return errors


def _type_errors(value: Any, kind: str | list | None, where: str) -> list[str]:
    if kind is None:
        return []
    kinds = kind if isinstance(kind, list) else [kind]
    return [] if any(_is_type(value, k) for k in kinds) else [f"{where}: not of type {kind}"]


def _is_type(value: Any, kind: str) -> bool:
    if kind in ("number", "integer"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return kind == "number" or float(value).is_integer()
    return isinstance(value, TYPES.get(kind, object))


def _object_errors(value: dict, schema: dict, where: str) -> list[str]:
    properties = schema.get("properties", {})
    errors = [f"{where}: lacks {key!r}" for key in schema.get("required", []) if key not in value]
    for key, item in value.items():
        if key in properties:
            errors += schema_errors(item, properties[key], f"{where}.{key}")
        elif schema.get("additionalProperties") is False:
            errors.append(f"{where}: {key!r} is not allowed")
    return errors
