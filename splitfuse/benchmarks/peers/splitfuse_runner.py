"""splitfuse as a user runs it: `splitfuse.pipeline(...)` with its defaults (dtype as the workload says).

The pipeline answers at once, eagerly, while its worker compiles in the background; the timed
phases wait for the worker's last "compiled i/n" line. The worker inherits this process's stderr,
so that is where the line is watched for (and passed on)."""
import os
import re
import threading
import time
from contextlib import contextmanager
from importlib.metadata import version

import splitfuse

from splitfuse.benchmarks.peers import harness

# The worker's line for its last bucket (a compile process's own lines start "compile process:").
COMPILED = re.compile(r"^compiled (\d+)/\1\b")
SETTLE_TIMEOUT_S = 1200


@contextmanager
def watch_stderr(pattern: re.Pattern):
    """Yields an event set once a line matching `pattern` passes through fd 2 (which child processes
    inherit), its `at` the perf_counter() of that moment; fd 2 is restored on the way out, so that a
    traceback is not left in the pipe."""
    read, write = os.pipe()
    original = os.dup(2)
    os.dup2(write, 2)
    os.close(write)
    seen = threading.Event()

    def pump() -> None:
        with os.fdopen(read, errors="replace") as lines:
            for line in lines:
                os.write(original, line.encode())
                if not seen.is_set() and pattern.search(line):
                    seen.at = time.perf_counter()
                    seen.set()

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        os.dup2(original, 2)
        thread.join(timeout=5)


@contextmanager
def open_engine(settings: dict):
    with watch_stderr(COMPILED) as compiled, splitfuse.pipeline(settings["model_dir"], dtype=settings["dtype"]) as pipe:
        def generate(prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
            responses = pipe(prompts, max_new_tokens=max_new_tokens, ignore_eos=True)
            failed = [r.error for r in responses if r.finish_reason == "error"]
            if failed:
                raise RuntimeError(f"{len(failed)} requests failed: {failed[0]}")
            return [r.token_ids for r in responses]

        def settle() -> None:
            if not compiled.wait(SETTLE_TIMEOUT_S):
                harness.progress(f"no 'compiled n/n' line from the worker in {SETTLE_TIMEOUT_S} s: timing anyway")

        yield harness.Engine(generate, {"version": version("splitfuse"), "how": "pipeline(), defaults"}, settle)


if __name__ == "__main__":
    harness.main(open_engine)
