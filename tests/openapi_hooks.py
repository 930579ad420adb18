"""schemathesis hooks for tests/openapi_check.py, on the bodies its fuzzing phase generates for the completion
endpoints (its coverage phase sends bodies as drawn; the check's server is started with a short maximum
length for them):
- at most a few tokens are asked for, so that answers end in seconds on a CPU;
- a list of prompts times `n` stays within the server's answers per request (128; the document bounds
  each, but cannot state their product);
- the contents of a structured-output constraint (a JSON Schema, a regex, a grammar), where they have the
  documented type, become a valid one of the same kind: they are languages of their own that the document
  does not restate, and the grammar engine refuses a bad one with a 400 (tests/test_structured_output.py
  checks those). A value of the wrong type is left as drawn, so that negative cases stay negative."""
import schemathesis

MAX_TOKENS = 4
MAX_CHOICES = 128  # HttpOptions.max_choices
VALID = {"json": {"type": "object"}, "regex": "[a-z]{1,8}", "grammar": 'start: "yes" | "no"'}


@schemathesis.hook
def map_body(ctx, body):
    if not isinstance(body, dict) or not ctx.operation.path.endswith("completions"):
        return body
    for field in ("max_tokens", "max_completion_tokens"):
        if not isinstance(body.get(field), int) or isinstance(body[field], bool) or body[field] > MAX_TOKENS:
            body[field] = MAX_TOKENS
    prompts, n = body.get("prompt"), body.get("n")
    # n as the server reads it: a JSON integer, written 48 or 48.0
    if isinstance(prompts, list) and prompts and isinstance(prompts[0], (str, list)) \
            and isinstance(n, (int, float)) and not isinstance(n, bool) and n * len(prompts) > MAX_CHOICES:
        body["n"] = max(MAX_CHOICES // len(prompts), 1)
    for kind in VALID:
        _valid(body, f"guided_{kind}", kind)
        _valid(body.get("structured_outputs"), kind, kind)
    response_format = body.get("response_format")
    if isinstance(response_format, dict):
        _valid(response_format.get("json_schema"), "schema", "json", dict)
    for tool in body.get("tools") if isinstance(body.get("tools"), list) else []:
        if isinstance(tool, dict):
            _valid(tool.get("function"), "parameters", "json", dict)
    return body


def _valid(holder, key: str, kind: str, documented: type | tuple = (dict, str)) -> None:
    """holder[key] := a valid constraint of `kind`, if it has a documented type (strings are non-empty)."""
    if isinstance(holder, dict) and isinstance(holder.get(key), documented) and holder[key] != "":
        holder[key] = VALID[kind]
