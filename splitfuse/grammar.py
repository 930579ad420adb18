"""Structured output: what a request may ask its text to match, as one llguidance grammar.

A request names one constraint, with vLLM's names for them (`structured_outputs`): `json` (a JSON Schema),
`json_object` (any JSON object), `regex`, `choice` (one of some strings) or `grammar` (Lark, as llguidance
writes it, or GBNF as llama.cpp does). llguidance compiles each to token masks; it has no dependencies,
so the frontend, which has no torch, refuses a bad constraint before any worker sees it. Imported by both."""
import functools
import json

import llguidance
from llguidance.gbnf_to_lark import GbnfToLarkError, any_to_lark

KINDS = ("json", "json_object", "regex", "choice", "grammar")
MAX_CHOICES = 1024
# How a worker's error about a request's own constraint begins (one the grammar meets only while generating, such
# as llguidance's limits on a parse): the frontend answers it as the client's error.
ERROR_PREFIX = "structured output: "
ERROR_CHARS = 300  # of llguidance's message, which can go on to print its parser's state and the whole grammar


def grammar(structured: dict) -> str:
    """The llguidance grammar of a constraint; ValueError naming what is wrong if it is not one."""
    if not isinstance(structured, dict) or len(structured) != 1 or next(iter(structured)) not in KINDS:
        raise ValueError(f"a structured output constraint is one of {', '.join(KINDS)}, got {_keys(structured)}")
    return _grammar_of(key(structured))


def key(structured: dict) -> str:
    """A constraint as the text its compiled forms are cached by: JSON in its own order (a schema's properties
    are generated in theirs)."""
    try:
        return json.dumps(structured)
    except (TypeError, ValueError):
        raise ValueError("a structured output constraint must be JSON (objects, lists, strings, numbers)") from None


def error_message(error: str) -> str:
    """A worker's error about a request's constraint, from llguidance's: its first line, shortened."""
    line = error.strip().split("\n", 1)[0]
    return ERROR_PREFIX + (line if len(line) <= ERROR_CHARS else line[:ERROR_CHARS] + "...")


@functools.lru_cache(maxsize=64)
def _grammar_of(key: str) -> str:
    """grammar() of the constraint written as `key`: compiled once, not once per choice of a request that asks
    for n of them (each choice's SamplingParams checks its constraint)."""
    (kind, value), = json.loads(key).items()
    try:
        text = _grammar(kind, value)
    except ValueError:
        raise
    except Exception as e:  # llguidance's GBNF reader and json raise other types on some malformed input
        raise ValueError(f"{kind}: cannot be read ({type(e).__name__}: {e})") from None
    if error := llguidance.LLMatcher.validate_grammar(text):
        raise ValueError(f"{kind}: {error.strip()}")
    return text


def _grammar(kind: str, value) -> str:
    if kind == "json":
        if isinstance(value, str):
            value = _json(value)
        if not isinstance(value, (dict, bool)):
            raise ValueError("json: a JSON Schema is an object (or its JSON text)")
        return llguidance.LLMatcher.grammar_from_json_schema(value, defaults={"whitespace_flexible": False})
    if kind == "json_object":
        if value is not True:
            raise ValueError("json_object: must be true")
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"})
    if kind == "regex":
        if not isinstance(value, str) or not value:
            raise ValueError("regex: must be a non-empty string")
        return llguidance.LLMatcher.grammar_from_regex(value)
    if kind == "choice":
        if (not isinstance(value, list) or not 0 < len(value) <= MAX_CHOICES
                or not all(isinstance(c, str) and c for c in value)):
            raise ValueError(f"choice: must be a list of 1 to {MAX_CHOICES} non-empty strings")
        return llguidance.LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in value))
    if not isinstance(value, str) or not value.strip():
        raise ValueError("grammar: must be a non-empty Lark or GBNF grammar")
    try:
        return llguidance.LLMatcher.grammar_from_lark(any_to_lark(value))
    except GbnfToLarkError as e:
        raise ValueError(f"grammar: {e}") from None


def _json(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"json: not JSON ({e})") from None


def _keys(value) -> str:
    return f"the keys {sorted(map(str, value))}" if isinstance(value, dict) else type(value).__name__
