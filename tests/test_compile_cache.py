"""The on-disk compile cache (compiled/precompile.py): a configuration compiles once per machine; a second
start loads what the first compiled, and a start that finds nothing serves while a process of its own
compiles. Each start is a process of its own, counting Inductor's graph compilations (cache misses) and
loads (hits), with the cache in a folder of the test's."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from splitfuse.config import cache_root

OPTIONS = dict(device="cpu", dtype="float32", token_budget=64, max_num_seqs=16, num_blocks=128, buckets=[1, 16, 64])
REPORT = """
import json, sys, torch
from splitfuse.config import EngineConfig
from splitfuse.compiled import precompile
def report(**extra):
    counts = torch._dynamo.utils.counters["inductor"]
    print(json.dumps({"compiled": counts["fxgraph_cache_miss"], "loaded": counts["fxgraph_cache_hit"], **extra}))
"""
# A start with the compile in the foreground.
FOREGROUND = REPORT + """
from splitfuse.worker.engine import Engine
config = EngineConfig(**json.loads(sys.argv[1]), background_compile=False)
engine = Engine(config, progress=False)
report(warm=precompile.is_warm(engine.runner.spec))
"""
# A start with the compile in the background: requests served meanwhile, counted while it still runs.
BACKGROUND = REPORT + """
from splitfuse.config import SamplingParams
from splitfuse.worker.engine import Engine
engine = Engine(EngineConfig(**json.loads(sys.argv[1])), progress=False)
was_warm = precompile.is_warm(engine.runner.spec)
done = set()
for i in range(8):
    engine.add_request(str(i), [1 + i, 2, 3, 4], SamplingParams(max_new_tokens=8, ignore_eos=True))
while engine.has_unfinished():
    done.update(o.id for o in engine.step() if o.finish_reason)
served_while_compiling = len(done) if not engine.runner.compiled.is_set() else None
assert engine.runner.compiled.wait(600)
report(was_warm=was_warm, served_while_compiling=served_while_compiling)
"""


@pytest.fixture
def cache(tmp_path):
    """A compile cache of the test's own; the C++ kernels built once per machine are shared (linked)."""
    folder = tmp_path / "cache"
    folder.mkdir()
    kernels = cache_root() / "kernels"
    if kernels.is_dir():
        (folder / "kernels").symlink_to(kernels)
    return folder


def start(script: str, model: Path, cache: Path, **options) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"} | {"SPLITFUSE_CACHE": str(cache)}
    result = subprocess.run([sys.executable, "-P", "-c", script, json.dumps(OPTIONS | options | {"model": str(model)})],
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]) | {"stderr": result.stderr}


def test_a_second_start_compiles_nothing(make_checkpoint, cache):
    model = make_checkpoint("llama")
    first = start(FOREGROUND, model, cache)
    assert (first["compiled"], first["loaded"], first["warm"]) == (1, 0, True)  # one graph for every bucket
    second = start(FOREGROUND, model, cache, num_blocks=64)  # the block count follows memory: no part of a graph
    assert (second["compiled"], second["loaded"]) == (0, 1)
    third = start(FOREGROUND, model, cache, block_size=32)  # another shape of the KV cache compiles anew
    assert third["compiled"] > 0


def test_a_cold_start_serves_while_a_process_of_its_own_compiles(make_checkpoint, cache):
    """Nothing cached: the eight requests are all answered while the compile is still running (it runs in
    another process first, then loads here); that process leaves the configuration warm, so this process
    compiles nothing itself, and neither does the next start."""
    model = make_checkpoint("qwen2")
    cold = start(BACKGROUND, model, cache)
    assert not cold["was_warm"] and cold["served_while_compiling"] == 8
    assert (cold["compiled"], cold["loaded"]) == (0, 1)
    assert "compile process done" not in cold["stderr"]  # progress=False: quiet
    warm = start(BACKGROUND, model, cache)
    assert warm["was_warm"] and (warm["compiled"], warm["loaded"]) == (0, 1)


def test_a_corrupt_cache_is_rebuilt_not_fatal(make_checkpoint, cache):
    model = make_checkpoint("llama")
    start(FOREGROUND, model, cache)
    for path in cache.rglob("*"):
        if path.is_file() and not path.is_symlink() and "kernels" not in path.parts:
            path.write_bytes(b"\0garbage")
    again = start(FOREGROUND, model, cache)
    assert again["warm"] and again["compiled"] + again["loaded"] == 1
