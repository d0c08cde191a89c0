"""The grammar of a V3.2 answer to one chat request: what the model may generate after the prompt.

It is written in llguidance's Lark dialect (`%json {...}` for JSON schemas, regex terminals with
`&`/`~` for text that must not spell a marker, `<[id]>` for a special token), and follows the chat
encoder (`dsv32.chat.encoding`) byte for byte, so that the completion parser
(`dsv32.chat.parse_completion`) reads back exactly what the grammar lets through:

- thinking (the prompt ends with `<think>`): reasoning text, then the `</think>` token, then the
  answer. Reasoning and plain answer text are free except for markup: they cannot spell `<think>`,
  `</think>`, `｜DSML` (a DSML tag, or a near miss of one) or the end-of-sentence text (the
  official parser rejects stray markup);
- json_object / json_schema: the answer is one JSON value under the schema (json_object: any
  object), nothing before or after it; the schema is always enforced; at each place JSON allows
  whitespace there is at most a space, or one line break and 32 spaces or tabs, so a model cannot
  loop on blanks; the end of sentence is the only token allowed once the value closes;
- tools offered, tool_choice "auto" (or unset): free text (or, with a JSON response_format, the
  JSON), or a call block `\\n\\n<｜DSML｜function_calls>` ... `</｜DSML｜function_calls>` whose invokes
  can only name an offered tool, with arguments under its schema: `strict: true` tools get the
  whole schema (a feature llguidance lacks is an error), the others a lenient reading (such
  features are ignored; a schema that cannot be compiled at all leaves that tool's arguments free);
  several invokes unless `parallel_tool_calls` is false;
- tool_choice "required": only a call block; a named tool_choice: exactly one invoke of it;
- no tools (or tool_choice "none"): free text, no call block can start.
With `safety_net=False` only what the request asks for explicitly is enforced (a JSON
response_format, required / named tool_choice, strict tools), and nothing at all otherwise.
Every answer ends with `<｜end▁of▁sentence｜>`, allowed exactly when the grammar is complete.

Tool arguments follow the encoder: each parameter on its own line,
`<｜DSML｜parameter name="k" string="true">raw text</｜DSML｜parameter>` for string values,
`string="false"` with JSON for the others. Parameters come in the order of `properties`; required
ones must appear, optional ones may be left out; other names only when the schema has no
`properties` (a free-form object). A parameter whose schema admits strings and other types may take
either form. Raw string values honour `enum`, `const`, `minLength`, `maxLength` and `pattern` (of
the schema and of its anyOf/oneOf branches); `format` is checked inside JSON values but not on raw
strings. oneOf is treated as anyOf.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .json_schema import ANY_TEXT, admits, pattern_regex, string_branches, string_literals, without_strings
from .tokens import (
    CALLS_CLOSE, CALLS_OPEN, CALLS_SEPARATOR, DSML, EOS, INVOKE_CLOSE, INVOKE_OPEN_HEAD, PARAM_CLOSE,
    PARAM_OPEN_HEAD, THINK_END, THINK_START,
)

# At each place JSON allows whitespace: nothing, a space, or one line break and some indentation.
JSON_WHITESPACE = r"(?:\r?\n[ \t]{0,32}| )?"
# Text that free reasoning and answers may not spell. DSML without its closing bar: a small model
# writes near misses such as `<｜DSMLfunction_calls>`, which are no call and no text either.
MARKUP = (DSML.rstrip("｜"), THINK_START, THINK_END, EOS)
# Parameters of one tool a grammar can enforce: the optional ones chain one rule per parameter, and
# llguidance walks that chain recursively (about 3 KB of stack each: ~2,600 overflowed an 8 MB stack
# and killed the process with SIGSEGV; threads may get 2 MB).
MAX_PARAMETERS = 256
STRING_TRUE, STRING_FALSE = '" string="true">', '" string="false">'


@dataclass(frozen=True)
class OutputSpec:
    """What a chat request asks of the answer: the fields of the request that constrain it."""

    response_format: dict | None = None
    tools: list | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool = True
    thinking: bool = False            # the generation starts inside the reasoning
    unchecked: frozenset[int] = field(default_factory=frozenset)   # tools whose arguments stay free


def _lit(text: str) -> str:
    """A Lark string literal."""
    return json.dumps(text, ensure_ascii=False)


def _rx(text: str) -> str:
    """`text` as a literal inside a /regex/."""
    return "".join("\\" + c if c in "\\.+*?()|[]{}^$#&-~/" else c for c in text).replace("\n", r"\n")


def _not_containing(*markers: str) -> str:
    """A Lark terminal matching any text in which none of `markers` occurs."""
    alts = "|".join(_rx(m) for m in markers)
    return f"/{ANY_TEXT}/ & ~/{ANY_TEXT}(?:{alts}){ANY_TEXT}/"


class Grammar:
    """Lark grammar text under construction; remembers which request field each line comes from."""

    def __init__(self):
        self.lines: list[tuple[str, str]] = []
        self._names: dict[str, int] = {}

    def name(self, stem: str) -> str:
        n = self._names[stem] = self._names.get(stem, 0) + 1
        return f"{stem}_{n}"

    def rule(self, name: str, body: str, where: str = "") -> str:
        """Add `name: body` (name may carry options, as in `x[lazy]`); return the bare name."""
        self.lines.append((f"{name}: {body}", where))
        return name.split("[")[0]

    @property
    def text(self) -> str:
        return "\n".join(line for line, _ in self.lines) + "\n"

    def where(self, line_no: int) -> str:
        return self.lines[line_no - 1][1] if 0 < line_no <= len(self.lines) else ""


class _Builder:
    """Builds the grammar of one request (see the module docstring)."""

    def __init__(self, think_end_id: int):
        self.g = Grammar()
        self.think_end_id = think_end_id
        self._raw_any: str | None = None
        self._json_any: str | None = None

    # -- JSON --------------------------------------------------------------------------------------
    def json(self, schema: Any, where: str, *, lenient: bool = False, root: dict | None = None) -> str:
        """A rule for one JSON value under `schema` (its $defs/definitions taken from `root`)."""
        if schema is False:
            raise ValueError(f"{where}: the schema `false` admits no value")
        if schema is True:
            schema = {}
        if not isinstance(schema, dict):
            raise ValueError(f"{where}: a JSON schema must be an object, not {type(schema).__name__}")
        schema = dict(schema)
        for key in ("$defs", "definitions"):
            if root is not None and isinstance(root.get(key), dict) and root is not schema:
                schema[key] = {**root[key], **schema.get(key, {})}
        options = {"whitespace_pattern": JSON_WHITESPACE, "coerce_one_of": True}
        if lenient:
            options["lenient"] = True
        schema["x-guidance"] = options
        return self.g.rule(self.g.name("json"), "%json " + json.dumps(schema, ensure_ascii=False), where)

    # -- DSML tool calls ---------------------------------------------------------------------------
    def raw_any(self) -> str:
        """Any raw string value and its closing tag (the value cannot contain that tag)."""
        if self._raw_any is None:
            self._raw_any = self.g.rule("raw_any[lazy]", f"/{ANY_TEXT}{_rx(PARAM_CLOSE)}/")
        return self._raw_any

    def raw_string(self, schema: dict, root: dict, where: str) -> str:
        """A rule for a raw (string="true") value admitted by `schema`, with the closing tag."""
        alts = []
        try:
            branches = [(b, string_literals(b)) for b in string_branches(schema, root)]
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        for branch, literals in branches:
            if literals is not None:
                alts += [_lit(v + PARAM_CLOSE) for v in literals]
                continue
            parts = []
            lo, hi = branch.get("minLength", 0), branch.get("maxLength")
            if lo or hi is not None:
                if not isinstance(lo, int) or not (hi is None or isinstance(hi, int)):
                    raise ValueError(f"{where}: minLength/maxLength must be integers")
                parts.append(f"/(?s:.){{{lo},{'' if hi is None else hi}}}/")
            if "pattern" in branch:
                parts.append(f"/{pattern_regex(branch['pattern'], where)}/")
            if not parts:
                return self.raw_any()       # one branch takes any string: the union does too
            terminal = self.g.name("RAW").upper()
            closed = " & ".join(parts + [_not_containing(PARAM_CLOSE)])
            self.g.rule(terminal, f"({closed}) {_lit(PARAM_CLOSE)}", where)
            alts.append(self.g.rule(self.g.name("raw") + "[lazy]", terminal, where))
        if not alts:
            raise ValueError(f"{where}: the schema admits no string")
        return self.g.rule(self.g.name("raw"), " | ".join(alts), where)

    def value(self, name_part: str, schema: Any, root: dict, where: str, lenient: bool) -> str:
        """`name_part` (the tag up to the name's closing quote) then a value under `schema`."""
        try:
            strings, others = admits(schema, root)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        alts = []
        if strings:
            raw = self.raw_any() if schema in (True, {}) else self.raw_string(schema, root, where)
            alts.append(f"{name_part} {_lit(STRING_TRUE)} {raw}")
        if others:
            js = self._json_any_rule() if schema in (True, {}) else \
                self.json(without_strings(schema), where, lenient=lenient, root=root)
            alts.append(f"{name_part} {_lit(STRING_FALSE)} {js} {_lit(PARAM_CLOSE)}")
        if not alts:
            raise ValueError(f"{where}: the schema admits no value")
        return self.g.rule(self.g.name("param"), " | ".join(alts), where)

    def _json_any_rule(self) -> str:
        if self._json_any is None:
            self._json_any = self.json({}, "")
        return self._json_any

    def invoke(self, spec: dict, where: str, *, check: bool, lenient: bool) -> str:
        """A rule for one invoke of function `spec` (arguments checked against its schema or not)."""
        name = spec["name"]
        params = spec.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise ValueError(f"{where}.parameters must be a JSON schema object")
        if params.get("type", "object") != "object":
            raise ValueError(f"{where}.parameters must describe an object (type \"object\")")
        if not check:
            params = {"type": "object"}
        head = _lit(f'{INVOKE_OPEN_HEAD}{name}">\n')
        body = self._parameters(params, where, lenient)
        return self.g.rule(self.g.name("invoke"), f"{head} {body} {_lit(INVOKE_CLOSE)}", where)

    def _parameters(self, params: dict, where: str, lenient: bool) -> str:
        """Parameter lines, each ending in a newline; a lone newline when there are none."""
        props = params.get("properties")
        required = params.get("required", [])
        extra = params.get("additionalProperties", True)
        if props is not None and not isinstance(props, dict):
            raise ValueError(f"{where}.parameters.properties must be an object")
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise ValueError(f"{where}.parameters.required must be a list of names")
        if props is None and extra is not False:      # a free-form object: any names
            name = self.g.rule(self.g.name("PNAME").upper(), '/[^"<>\\n]+/')
            value = self.value(f"{_lit(PARAM_OPEN_HEAD)} {name}", extra, params, f"{where}.parameters",
                               lenient)
            return f'("\\n" | ({value} "\\n")+)'
        props = dict(props or {})
        for key in required:
            if key not in props:
                if extra is False:
                    raise ValueError(f"{where}.parameters: required {key!r} is not a property and "
                                     "additionalProperties is false")
                props[key] = extra
        if len(props) > MAX_PARAMETERS:
            raise ValueError(f"{where}.parameters: {len(props)} parameters are more than a grammar can "
                             f"enforce (at most {MAX_PARAMETERS})")
        items = []
        for key, sub in props.items():
            if any(c in key for c in '"<>'):
                raise ValueError(f"{where}.parameters: name {key!r} contains a character DSML cannot "
                                 'carry (", <, >)')
            rule = self.value(_lit(f'{PARAM_OPEN_HEAD}{key}'), sub, params,
                              f"{where}.parameters.{key}", lenient)
            items.append((rule, key in required))
        if not items:
            return '"\\n"'
        # rest[i]: the lines of parameters i.. (each optional one may be absent)
        rest: list[str | None] = [None] * (len(items) + 1)
        for i in range(len(items) - 1, -1, -1):
            rule, req = items[i]
            item = f'{rule} "\\n"' if req else f'({rule} "\\n")?'
            rest[i] = self.g.rule(self.g.name("params"), item + (f" {rest[i + 1]}" if rest[i + 1] else ""))
        if any(req for _, req in items):
            return rest[0]
        firsts = ['"\\n"'] + [f'{rule} "\\n"' + (f" {rest[i + 1]}" if rest[i + 1] else "")
                              for i, (rule, _) in enumerate(items)]
        return "(" + " | ".join(firsts) + ")"

    def calls_rest(self, invokes: list[str], many: bool) -> str:
        """What follows `<｜DSML｜function_calls>`: the invokes, the closing tag, nothing after."""
        one = invokes[0] if len(invokes) == 1 else self.g.rule("any_invoke", " | ".join(invokes))
        body = f'{one} ("\\n" {one})*' if many else one
        return self.g.rule("calls_rest", f'"\\n" {body} "\\n" {_lit(CALLS_CLOSE)}')

    # -- free text and the whole answer ------------------------------------------------------------
    def free_text(self) -> str:
        """Text without markup (see MARKUP)."""
        return self.g.rule("FREE", _not_containing(*MARKUP))

    def text_then_calls(self) -> str:
        """Free text, then the function_calls tag (the text may end in the encoder's blank line)."""
        self.g.rule("CALLS_LEAD", f"({_not_containing(*MARKUP)}) {_lit(CALLS_OPEN)}")
        return self.g.rule("calls_lead[lazy]", "CALLS_LEAD")

    def start(self, answer: str, thinking: bool) -> None:
        if thinking:
            self.g.rule("REASONING", _not_containing(*MARKUP))
            self.g.rule("start", f"REASONING <[{self.think_end_id}]> {answer}")
        else:
            self.g.rule("start", answer)


# ---- the request fields --------------------------------------------------------------------------

def json_answer_schema(response_format: Any) -> Any:
    """The schema a JSON response_format asks for, or None for plain text."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise ValueError("response_format must be an object")
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise ValueError("response_format.json_schema must be an object with a `schema`")
        schema = spec.get("schema", {})
        if not isinstance(schema, (dict, bool)):
            raise ValueError("response_format.json_schema.schema must be a JSON schema object")
        return schema
    raise ValueError(f"response_format.type must be text, json_object or json_schema, not {kind!r}")


def functions(tools: Any) -> list[tuple[dict, bool]]:
    """(function spec, strict) of each tool, checked."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise ValueError("tools must be a list")
    result, seen = [], set()
    for i, tool in enumerate(tools):
        spec = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(spec, dict) or tool.get("type", "function") != "function":
            raise ValueError(f'tools[{i}] must be {{"type": "function", "function": {{...}}}}')
        name = spec.get("name")
        if not isinstance(name, str) or not name or any(c in name for c in '"<>'):
            raise ValueError(f"tools[{i}].function.name must be a non-empty string without \", < or >")
        if name in seen:
            raise ValueError(f"tools[{i}]: two tools are named {name!r}")
        seen.add(name)
        result.append((spec, spec.get("strict") is True))
    return result


def tool_choice_mode(tool_choice: Any, names: list[str]) -> tuple[str, str | None]:
    """("none" | "auto" | "required" | "named", function name)."""
    if tool_choice is None:
        return ("auto" if names else "none"), None
    if tool_choice in ("none", "auto", "required"):
        if tool_choice == "required" and not names:
            raise ValueError('tool_choice "required" needs tools')
        return tool_choice, None
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if not isinstance(function, dict) or tool_choice.get("type", "function") != "function":
        raise ValueError('tool_choice must be "none", "auto", "required" or '
                         '{"type": "function", "function": {"name": ...}}')
    name = function.get("name")
    if name not in names:
        raise ValueError(f"tool_choice names function {name!r}, which is not among the tools")
    return "named", name


def request_grammar(spec: OutputSpec, think_end_id: int = 128799, safety_net: bool = True) -> Grammar | None:
    """The Lark grammar that a request's output must follow, or None when nothing is constrained."""
    schema = json_answer_schema(spec.response_format)
    tools = functions(spec.tools)
    mode, named = tool_choice_mode(spec.tool_choice, [f["name"] for f, _ in tools])
    if mode == "none":
        tools = []
    explicit = schema is not None or mode in ("required", "named") or \
        (mode == "auto" and any(strict for _, strict in tools))
    if not (explicit or safety_net):
        return None
    b = _Builder(think_end_id)
    required = mode in ("required", "named")
    check_all = safety_net or required
    invokes = [b.invoke(f, f"tools[{i}].function", lenient=not strict,
                        check=(strict or check_all) and i not in spec.unchecked)
               for i, (f, strict) in enumerate(tools) if mode != "named" or f["name"] == named]
    answers = []
    if invokes:
        rest = b.calls_rest(invokes, many=mode != "named" and spec.parallel_tool_calls)
        if required or schema is not None:
            answers.append(f"{_lit(CALLS_SEPARATOR + CALLS_OPEN)} {rest}")
        else:
            answers.append(f"{b.text_then_calls()} {rest}")
    if schema is not None and not required:
        answers.append(b.json(schema, "response_format.json_schema.schema",
                              root=schema if isinstance(schema, dict) else None))
    elif not required:
        answers.append(b.free_text())
    b.start(b.g.rule("answer", " | ".join(answers)), spec.thinking)
    return b.g
