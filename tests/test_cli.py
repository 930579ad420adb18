"""The `splitfuse` command's options, made from the config dataclasses."""
import pytest

from splitfuse import cli
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


def test_serve_takes_http_backpressure_and_access_options():
    args = cli._parser().parse_args(["serve", "--http-port", "8000", "--no-zmq", "--api-key", "k",
                                     "--max-queued-requests", "64", "--max-queued-tokens", "65536",
                                     "--shutdown-timeout", "5"])
    assert (args.http_port, args.zmq, args.api_key, args.max_queued_requests, args.max_queued_tokens,
            args.shutdown_timeout) == (8000, False, "k", 64, 65536, 5.0)
    with pytest.raises(SystemExit, match="both --curve-secret and --curve-clients"):
        cli.main(["serve", "--curve-secret", "server.key_secret"])
