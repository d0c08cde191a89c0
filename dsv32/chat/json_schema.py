"""What JSON schemas admit, as far as the DSML grammar needs to know (raw strings vs JSON values).

A DSML parameter carries a string raw (`string="true"`) and any other value as JSON; these helpers
tell which of the two forms a schema admits, and the string constraints a raw value must meet.
"""
from __future__ import annotations

from typing import Any

import llguidance

ANY_TEXT = "(?s:.*)"


def string_literals(schema: dict) -> list[str] | None:
    """The string values an enum/const schema allows, or None when it is not one."""
    if "const" in schema:
        return [schema["const"]] if isinstance(schema["const"], str) else []
    if "enum" in schema:
        if not isinstance(schema["enum"], list):
            raise ValueError("enum must be a list")
        return [v for v in schema["enum"] if isinstance(v, str)]
    return None


def pattern_regex(pattern: Any, where: str) -> str:
    """A JSON-schema `pattern` (a search, anchored only by ^ and $) as a whole-text regex."""
    if not isinstance(pattern, str):
        raise ValueError(f"{where}: pattern must be a string")
    start = pattern.startswith("^")
    end = pattern.endswith("$") and not pattern.endswith("\\$")
    body = pattern[1 if start else 0:len(pattern) - 1 if end else len(pattern)]
    body = llguidance.regex_to_lark(body, "dw")
    return ("" if start else ANY_TEXT) + f"(?:{body})" + ("" if end else ANY_TEXT)


def resolve(schema: Any, root: dict, depth: int = 0) -> Any:
    """Follow a local `$ref` (#/$defs/..., #/definitions/..., #)."""
    while isinstance(schema, dict) and isinstance(schema.get("$ref"), str) and depth < 32:
        ref, depth = schema["$ref"], depth + 1
        if not ref.startswith("#"):
            raise ValueError(f"$ref {ref!r}: only local references (#/...) are supported")
        target: Any = root
        for part in filter(None, ref[1:].split("/")):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise ValueError(f"$ref {ref!r} points nowhere")
            target = target[part]
        siblings = {k: v for k, v in schema.items() if k != "$ref"}
        schema = {**target, **siblings} if isinstance(target, dict) and siblings else target
    return schema


def admits(schema: Any, root: dict) -> tuple[bool, bool]:
    """(admits some string, admits some non-string value), as far as types, enum and const tell."""
    schema = resolve(schema, root)
    if isinstance(schema, bool):
        return schema, schema
    if not isinstance(schema, dict):
        raise ValueError(f"a JSON schema must be an object, not {type(schema).__name__}")
    strings, others = True, True
    kind = schema.get("type")
    if kind is not None:
        if not isinstance(kind, (str, list)) or not all(isinstance(k, str) for k in kind):
            raise ValueError("type must be a string or a list of strings")
        kinds = {kind} if isinstance(kind, str) else set(kind)
        strings, others = "string" in kinds, bool(kinds - {"string"})
    literals = [schema["const"]] if "const" in schema else schema.get("enum")
    if isinstance(literals, list):
        strings = strings and any(isinstance(v, str) for v in literals)
        others = others and any(not isinstance(v, str) for v in literals)
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            branches = [admits(b, root) for b in schema[key]]
            strings = strings and any(s for s, _ in branches)
            others = others and any(o for _, o in branches)
    for branch in schema.get("allOf", []) if isinstance(schema.get("allOf"), list) else []:
        s, o = admits(branch, root)
        strings, others = strings and s, others and o
    return strings, others


def string_branches(schema: Any, root: dict) -> list[dict]:
    """The schemas whose string constraints describe the raw strings `schema` admits."""
    schema = resolve(schema, root)
    if isinstance(schema, bool):
        return [{}] if schema else []
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            return [b for branch in schema[key] if admits(branch, root)[0]
                    for b in string_branches(branch, root)]
    return [schema]


def without_strings(schema: Any) -> Any:
    """`schema` less its string values where that is easy to say (type lists, enum, const)."""
    if not isinstance(schema, dict):
        return schema
    schema = dict(schema)
    kind = schema.get("type")
    if isinstance(kind, list) and "string" in kind:
        schema["type"] = [k for k in kind if k != "string"]
    if isinstance(schema.get("enum"), list):
        schema["enum"] = [v for v in schema["enum"] if not isinstance(v, str)]
    return schema

