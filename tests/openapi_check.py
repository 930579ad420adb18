"""schemathesis against the server's /openapi.json: every request the document allows gets an answer the
document describes (status, content type, body), and every request it forbids is refused.

Run by `make check-openapi`, which installs schemathesis in a venv of its own (it brings its own hypothesis and
friends); the file name keeps it out of `make test`, since the run takes several minutes."""
import os
import subprocess
from pathlib import Path

from splitfuse.frontend.serve import serve

SCHEMATHESIS = os.environ.get("SCHEMATHESIS", ".venv-schemathesis/bin/schemathesis")
# A chat that gives no max_tokens may run to the model's length: 1024 keeps it inside the timeout.
ENGINE = dict(device="cpu", dtype="float32", eager=True, max_model_len=1024)


def test_every_answer_is_the_documented_one():
    with serve(http_port=0, zmq=False, ready_timeout=300, **ENGINE) as deployment:
        run = subprocess.run([SCHEMATHESIS, "run", f"{deployment.http_url}/openapi.json", "--max-examples", "30",
                              "--request-timeout", "120", "--seed", "1", "--no-color"],
                             capture_output=True, text=True, timeout=1800,
                             env=os.environ | {"SCHEMATHESIS_HOOKS": "openapi_hooks",
                                               "PYTHONPATH": str(Path(__file__).parent)})
    assert run.returncode == 0, run.stdout[-12000:] + run.stderr[-2000:]
    print(run.stdout[run.stdout.rfind("Test cases:"):])
