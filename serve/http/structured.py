"""Structured output in a request: OpenAI's ``response_format``, vLLM's ``structured_outputs`` and its old names.

vLLM 0.12 replaced its ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar`` /
``guided_whitespace_pattern`` fields with one ``structured_outputs`` object (``json``, ``regex``,
``choice``, ``grammar``, ``json_object``, ``whitespace_pattern``, ``disable_any_whitespace``). Both
spellings are served: the ``guided_*`` fields as aliases, and a request that sets both spellings is
refused, naming the old one. A request asks for one structure at most, from whichever field; it
becomes one ``wire.StructuredSpec`` (the field it came from is the ``param`` an engine refusal names).

This module knows nothing about tokenizers, models or the engine.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import Field, model_validator

from nextoken.serve.http.errors import broken_rule
from nextoken.serve.http.fields import (
    NonEmptyText,
    ResponseFormat,
    ResponseFormatJsonObject,
    ResponseFormatJsonSchema,
    StructuredOutputs,
    Text,
    _Open,
)
from nextoken.serve.wire import StructuredKind, StructuredSpec

GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
# guided_* field -> the structured_outputs key it is the old name of
ALIASES = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar",
           "guided_whitespace_pattern": "whitespace_pattern"}
CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object")  # structured_outputs: exactly one


def _schema(value: dict[str, Any] | str, param: str) -> dict[str, Any]:
    """A JSON Schema given as an object or, as vLLM also takes it, as its JSON text."""
    if isinstance(value, dict):
        return value
    try:
        value = json.loads(value)
    except json.JSONDecodeError as e:
        raise broken_rule(f"{param} is not valid JSON: {e}", param) from None
    if not isinstance(value, dict):
        raise broken_rule(f"{param} must be a JSON schema object, got {type(value).__name__}", param)
    return value


class StructuredFields(_Open):
    """The structured-output fields of the generation requests, and the rules between them."""

    response_format: ResponseFormat = Field(
        default=None, description="json_object: the output is one JSON object; json_schema: it matches the "
                                  "schema; enforced on every token by the grammar engine.")
    structured_outputs: StructuredOutputs | None = Field(
        default=None, description="vLLM extension (0.12+): exactly one of json, regex, choice, grammar, "
                                  "json_object, enforced on every token; the guided_* fields are its old names.")
    guided_json: dict[str, Any] | Text | None = Field(
        default=None, description="vLLM's old name of structured_outputs.json: a JSON Schema (object or JSON "
                                  "text) the output matches.")
    guided_regex: NonEmptyText | None = Field(default=None, description="vLLM's old name of structured_outputs."
                                                                         "regex: the output matches this regex.")
    guided_choice: Annotated[list[NonEmptyText], Field(min_length=1, max_length=256)] | None = Field(
        default=None, description="vLLM's old name of structured_outputs.choice: the output is exactly one of "
                                  "these strings.")
    guided_grammar: NonEmptyText | None = Field(
        default=None, description="vLLM's old name of structured_outputs.grammar: a Lark or GBNF grammar the "
                                  "output matches.")
    guided_whitespace_pattern: NonEmptyText | None = Field(
        default=None, description="vLLM's old name of structured_outputs.whitespace_pattern: the whitespace "
                                  "allowed between JSON tokens (a regex), with a JSON structure only. Default: "
                                  "1-16 JSON whitespace characters.")

    @model_validator(mode="after")
    def _structured_rules(self) -> StructuredFields:
        so = self.structured_outputs
        if so is not None:
            old = next((name for name in ALIASES if getattr(self, name) is not None), None)
            if old is not None:
                raise broken_rule(f"{old} is the old name of structured_outputs.{ALIASES[old]}: use one spelling, "
                                  "not both", old)
            kinds = [k for k in CONSTRAINTS if getattr(so, "json_" if k == "json" else k) is not None]
            if not kinds:
                raise broken_rule("structured_outputs needs one constraint: json, regex, choice, grammar or "
                                  "json_object", "structured_outputs")
            if len(kinds) > 1:
                raise broken_rule(f"structured_outputs takes one constraint, got {', '.join(kinds)}",
                                  f"structured_outputs.{kinds[1]}")
            if so.json_ is not None:
                so.json_ = _schema(so.json_, "structured_outputs.json")
            for option in ("whitespace_pattern", "disable_any_whitespace"):
                if getattr(so, option) is not None and kinds[0] not in ("json", "json_object"):
                    raise broken_rule(f"structured_outputs.{option} applies to JSON output only (json or "
                                      "json_object)", f"structured_outputs.{option}")
            if so.disable_any_whitespace and so.whitespace_pattern is not None:
                raise broken_rule("structured_outputs.disable_any_whitespace allows no whitespace; a "
                                  "whitespace_pattern says which: set one", "structured_outputs.whitespace_pattern")
        given = self.structured_fields()
        if len(given) > 1:
            raise broken_rule(f"at most one structured-output field per request, got {', '.join(given)}", given[1])
        if self.guided_whitespace_pattern is not None and not (given and given[0] in ("response_format",
                                                                                      "guided_json")):
            raise broken_rule("guided_whitespace_pattern applies to JSON output only (response_format json_object "
                              "or json_schema, or guided_json)", "guided_whitespace_pattern")
        if self.guided_json is not None:
            self.guided_json = _schema(self.guided_json, "guided_json")
        return self

    def structured_fields(self) -> list[str]:
        """The fields that ask for a structure (at most one passes the rules)."""
        given = [name for name in GUIDED if getattr(self, name) is not None]
        if self.structured_outputs is not None:
            given.insert(0, "structured_outputs")
        if self.response_format is not None and self.response_format.type != "text":
            given.insert(0, "response_format")
        return given

    @property
    def structured(self) -> StructuredSpec | None:
        """The structure asked for, as the engine's grammar takes it (None: plain text)."""
        ws, ws_param = self.guided_whitespace_pattern, "guided_whitespace_pattern"
        rf, so = self.response_format, self.structured_outputs
        if isinstance(rf, ResponseFormatJsonObject):
            return StructuredSpec(StructuredKind.JSON_OBJECT, "response_format", whitespace=ws)
        if isinstance(rf, ResponseFormatJsonSchema):
            return StructuredSpec(StructuredKind.JSON_SCHEMA, "response_format", schema=rf.json_schema.schema_,
                                  whitespace=ws)
        if so is not None:
            # no whitespace at all is the empty pattern: llguidance then allows none between JSON tokens
            ws = "" if so.disable_any_whitespace else so.whitespace_pattern
            opts = {"whitespace": ws, "whitespace_param": "structured_outputs.whitespace_pattern"}
            if so.json_ is not None:
                return StructuredSpec(StructuredKind.JSON_SCHEMA, "structured_outputs.json", schema=so.json_, **opts)
            if so.json_object:
                return StructuredSpec(StructuredKind.JSON_OBJECT, "structured_outputs.json_object", **opts)
            if so.regex is not None:
                return StructuredSpec(StructuredKind.REGEX, "structured_outputs.regex", regex=so.regex)
            if so.choice is not None:
                return StructuredSpec(StructuredKind.CHOICE, "structured_outputs.choice", choices=tuple(so.choice))
            return StructuredSpec(StructuredKind.GRAMMAR, "structured_outputs.grammar", grammar=so.grammar)
        if self.guided_json is not None:
            return StructuredSpec(StructuredKind.JSON_SCHEMA, "guided_json", schema=self.guided_json, whitespace=ws,
                                  whitespace_param=ws_param)
        if self.guided_regex is not None:
            return StructuredSpec(StructuredKind.REGEX, "guided_regex", regex=self.guided_regex)
        if self.guided_choice is not None:
            return StructuredSpec(StructuredKind.CHOICE, "guided_choice", choices=tuple(self.guided_choice))
        if self.guided_grammar is not None:
            return StructuredSpec(StructuredKind.GRAMMAR, "guided_grammar", grammar=self.guided_grammar)
        return None
