"""The peers benchmark's parts that need no peer installed: its workload, its table, its bookkeeping."""
import json
import random
import statistics

from splitfuse.benchmarks.peers import report, workload
from splitfuse.benchmarks.peers.run import error_line


def fake_model_dir(tmp_path, vocab_size: int = 200):
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": vocab_size, "bos_token_id": 1,
                                                      "eos_token_id": 2, "pad_token_id": 2}))
    (tmp_path / "tokenizer.json").write_text(json.dumps({"added_tokens": [{"id": i} for i in range(5)]}))
    return tmp_path


def test_prompt_lengths_are_clipped_normal():
    class Extremes(random.Random):
        values = iter([-50.0, 5000.0, 383.6])

        def gauss(self, mu, sigma):
            return next(self.values)

    assert workload.prompt_lengths(Extremes(), 3) == [workload.PROMPT_MIN, workload.PROMPT_MAX, 384]
    lengths = workload.prompt_lengths(random.Random(0), 4000)
    assert min(lengths) >= workload.PROMPT_MIN and max(lengths) <= workload.PROMPT_MAX
    assert abs(statistics.fmean(lengths) - workload.PROMPT_MEAN) < 8
    assert abs(statistics.stdev(lengths) - workload.PROMPT_STD) < 8


def test_workload_avoids_special_ids_and_is_seeded(tmp_path):
    model_dir = fake_model_dir(tmp_path)
    work = workload.build(model_dir, seed=3)
    assert work == workload.build(model_dir, seed=3) != workload.build(model_dir, seed=4)
    prompts = [work["probe"], *work["warmup"], *work["single"], *work["offline"]]
    assert all(5 <= t < 200 for p in prompts for t in p)
    assert len(work["offline"]) == workload.OFFLINE_REQUESTS and work["offline_new_tokens"] == 48
    assert len(work["warmup"]) == len(work["offline"])
    assert [len(p) for p in work["single"]] == [32] * workload.SINGLE_REPEATS and work["single_new_tokens"] == 64
    quick = workload.build(model_dir, quick=True)
    assert len(quick["offline"]) == workload.QUICK_OFFLINE_REQUESTS < workload.OFFLINE_REQUESTS


def test_table_rows_and_errors():
    rows = [{"label": "a", "offline_tok_s": 101.4, "single_tok_s": 27.6, "ready_s": 1.23,
             "one_off": {"what": "export", "seconds": 15.2}},
            {"label": "b", "error": "RuntimeError: no | pipes"}]
    lines = report.table(rows).splitlines()
    assert lines[0] == "| system | offline gen tok/s | single stream tok/s | ready after (cold) |"
    assert lines[2] == "| a | 101 | 28 | 1.2 s (after a 15 s one-off export) |"
    assert lines[3] == "| b | could not run: RuntimeError: no / pipes | - | - |"
    assert all(line.count("|") == 5 for line in lines)


def test_agreement_and_error_line():
    assert report.agreement([[1, 2, 3], [4, 5], [7]], [[1, 2, 9], [4, 5], [8]]) == {
        "first_token_equal": 2, "requests": 3, "mean_common_prefix": 4 / 3}
    log = ["loading", "Traceback (most recent call last):", "  File x", "RuntimeError: bad CPU", "exiting"]
    assert error_line(log) == "RuntimeError: bad CPU"
    assert error_line(["just this"]) == "just this"
