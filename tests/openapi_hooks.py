"""schemathesis hooks for tests/openapi_check.py: every body its fuzzing phase generates asks for at most a few
tokens, so that answers end in seconds on a CPU. (Its coverage phase sends bodies as drawn; the check's server
is started with a short maximum length for them.)"""
import schemathesis

MAX_TOKENS = 4


@schemathesis.hook
def map_body(ctx, body):
    if isinstance(body, dict):
        for field in ("max_tokens", "max_completion_tokens"):
            if not isinstance(body.get(field), int) or isinstance(body[field], bool) or body[field] > MAX_TOKENS:
                body[field] = MAX_TOKENS
    return body
