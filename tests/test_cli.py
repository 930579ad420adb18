"""The `splitfuse` command's options, made from the config dataclasses, and its logs."""
import contextlib
import json
import os
import subprocess
import sys

import pytest

from splitfuse import cli
from splitfuse import protocol
from splitfuse.config import SamplingParams


def test_cli_options_come_from_the_config_dataclasses():
    args = cli._parser().parse_args(["generate", "hi", "--max-new-tokens", "5", "--stop", "a", "b", "--eager",
                                     "--num-blocks", "64", "--do-sample", "--temperature", "0.5"])
    assert cli._options(args, SamplingParams) == {"max_new_tokens": 5, "stop": ["a", "b"], "do_sample": True,
                                                  "temperature": 0.5}
    assert cli._engine_options(args) == {"eager": True, "num_blocks": 64, "model": None}
    demo = cli._parser().parse_args(["demo"])
    assert cli._options(demo, SamplingParams) == {"max_new_tokens": 64}


def test_cli_reports_bad_options_without_a_traceback():
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "hi", "--temperature", "-1"])
    assert "temperature must be 0 (greedy) or in [0.01, 100.0]" in str(exit_info.value)


def test_json_object_options_are_read_as_json():
    args = cli._parser().parse_args(["generate", "hi", "--logit-bias", '{"5": 1.5, "7": -2}',
                                     "--structured", '{"regex": "a+"}'])
    assert cli._options(args, SamplingParams) == {"logit_bias": {5: 1.5, 7: -2}, "structured": {"regex": "a+"}}
    for bad in ("5=1", "[1]", '{"x": 1}'):
        with pytest.raises(SystemExit):
            cli._parser().parse_args(["generate", "hi", "--logit-bias", bad])


@pytest.mark.parametrize("address", ["bogus", "tcp://127.0.0.1:1"])
def test_a_wrong_address_is_one_line_of_error(address):
    """A malformed address, or one no server listens on (after the client's connection timeout, shortened)."""
    run = subprocess.run([sys.executable, "-P", "-c", "import sys; from splitfuse.frontend import client; "
                          "client.Client.__init__.__kwdefaults__['connection_timeout'] = 2.0; "
                          "from splitfuse import cli; cli.main(sys.argv[1:])", "generate", "Hi", "--address", address],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and run.stderr.startswith("splitfuse: error: ") and "Traceback" not in run.stderr, \
        run.stderr


def test_chat_goes_on_after_a_refused_turn(monkeypatch, capsys):
    """A turn the server refuses is reported and left out of the history; the next turn is answered."""
    sent = []

    class Server:
        def generate(self, history, **sampling):
            sent.append([turn["content"] for turn in history])
            if history[-1]["content"] == "too long":
                raise ValueError("the prompt is longer than the model's context")
            yield protocol.Delta("1", text="fine", finish_reason="stop")

    @contextlib.contextmanager
    def connect(args):
        yield Server(), {}

    monkeypatch.setattr(cli, "_connect", connect)
    lines = iter(["too long", "hello"])

    def read(prompt):
        line = next(lines, None)
        if line is None:
            raise EOFError
        return line

    monkeypatch.setattr("builtins.input", read)
    cli._chat(cli._parser().parse_args(["chat"]))
    assert sent == [["too long"], ["hello"]]
    out = capsys.readouterr().out
    assert "[error: the prompt is longer than the model's context]" in out and "fine" in out


def test_serve_takes_http_backpressure_and_access_options():
    args = cli._parser().parse_args(["serve", "--http-port", "8000", "--no-zmq", "--api-key", "k",
                                     "--max-queued-requests", "64", "--max-queued-tokens", "65536",
                                     "--shutdown-timeout", "5"])
    assert (args.http_port, args.zmq, args.api_key, args.max_queued_requests, args.max_queued_tokens,
            args.shutdown_timeout) == (8000, False, "k", 64, 65536, 5.0)
    with pytest.raises(SystemExit, match="both --curve-secret and --curve-clients"):
        cli.main(["serve", "--curve-secret", "server.key_secret"])


def test_log_level_debug_gives_a_line_per_request_with_its_id_and_json_on_request(tmp_path):
    """`--log-level debug`: the request's lines carry its id; SPLITFUSE_LOG_FORMAT=json: one object a line,
    the workers' lines included (they inherit the level)."""
    env = os.environ | {"SPLITFUSE_LOG_FORMAT": "json"}
    run = subprocess.run([sys.executable, "-P", "-m", "splitfuse.cli", "generate", "Hello", "--max-new-tokens", "2",
                          "--eager", "--num-blocks", "64", "--log-level", "debug"],
                         capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [json.loads(line) for line in run.stderr.splitlines() if line.startswith("{")]
    about = [line for line in lines if line.get("request_id") == "0"]
    assert [line["message"].split(":")[1].strip().split()[0] for line in about] == ["sent", "finished"]
    assert {"splitfuse.cli", "splitfuse.worker.main"} <= {line["logger"] for line in lines}
    quiet = subprocess.run([sys.executable, "-P", "-m", "splitfuse.cli", "generate", "Hello", "--max-new-tokens", "2",
                            "--eager", "--num-blocks", "64", "--log-level", "warning"],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert quiet.returncode == 0 and "replica 0: ready" not in quiet.stderr, quiet.stderr[-3000:]
