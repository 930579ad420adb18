"""Tool calls in a model's text: the grammar that makes a model call a tool, and the parser that reads calls
back, for the two formats open chat models are trained on.

- `hermes`: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, any number of them, after
  some text or none (Qwen2 and 2.5, Hermes 2 and 3, and the models tuned on their data);
- `llama3_json`: the whole answer one JSON object `{"name": ..., "parameters": {...}}`, or several joined
  by `;`, after an optional `<|python_tag|>` (Llama 3.1, 3.2 and 3.3).

The chat template receives the tools (it tells the model their signatures, in its own words); these
formats only read what the model writes."""
import json
import re
import uuid
from dataclasses import dataclass

TOOL_PARSERS = ("hermes", "llama3_json")
COMPACT = {"x-guidance": {"whitespace_flexible": False}}  # llguidance: JSON without free whitespace


@dataclass(frozen=True, slots=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI's API gives it
    id: str

    def openai(self, index: int | None = None) -> dict:
        return ({} if index is None else {"index": index}) | {
            "id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


class ToolFormat:
    """One model family's way of writing calls."""

    def __init__(self, name: str):
        if name not in TOOL_PARSERS:
            raise ValueError(f"tool call parser must be one of {', '.join(TOOL_PARSERS)}, got {name!r}")
        self.name = name

    def constraint(self, tools: list[dict]) -> dict:
        """The structured-output constraint (grammar.py) under which the answer is exactly one call of one of
        `tools` (OpenAI function tools), its arguments valid for that function's parameters."""
        key = "arguments" if self.name == "hermes" else "parameters"
        calls = [{"type": "object", "required": ["name", key], "additionalProperties": False,
                  "properties": {"name": {"const": t["function"]["name"]},
                                 key: t["function"].get("parameters") or {"type": "object"}}} for t in tools]
        schema = {"anyOf": calls} | COMPACT
        if self.name == "llama3_json":
            return {"json": schema}
        return {"grammar": f'start: "<tool_call>\\n" call "\\n</tool_call>"\ncall: %json {json.dumps(schema)}'}

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """(the text that is not calls, the calls); no calls when the text holds none that parse."""
        if self.name == "hermes":
            found = list(re.finditer(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", text, re.DOTALL))
            calls = [_call(m.group(1), "arguments") for m in found]
            if found and all(calls):
                return (text[:found[0].start()] + text[found[-1].end():]).strip(), calls
            return text, []
        body = text.strip().removeprefix("<|python_tag|>")
        calls = [_call(part, "parameters") for part in body.split(";")] if body.startswith("{") else []
        return ("", calls) if calls and all(calls) else (text, [])

    def streamable(self, text: str) -> int:
        """How much of an answer's text so far can be streamed as content: not what may begin a call."""
        if self.name == "llama3_json":
            stripped = text.lstrip()
            return 0 if not stripped or "{<|python_tag|>".startswith(stripped[:1]) else len(text)
        start = text.find("<tool_call>")
        if start >= 0:
            return start
        return next((i for i in range(max(len(text) - len("<tool_call>"), 0), len(text))
                     if "<tool_call>".startswith(text[i:])), len(text))


def _call(body: str, key: str) -> ToolCall | None:
    try:
        call = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get(key, call.get("arguments", {}))
    return ToolCall(call["name"], json.dumps(arguments, ensure_ascii=False), f"call_{uuid.uuid4().hex[:24]}")
