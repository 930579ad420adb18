"""Fixed-shape execution: bucket bookkeeping on CPU, compiled == eager, one graph for every bucket."""
import ctypes
import subprocess
import sys
import time

import pytest
import torch
import torch._dynamo.utils

from splitfuse.compiled import runner as runner_module
from splitfuse.compiled.loader import load_model
from splitfuse.compiled.runner import ModelRunner, SequenceChunk, default_buckets
from splitfuse.config import EngineConfig, SamplingParams
from splitfuse.worker.engine import Engine


def test_default_buckets():
    assert default_buckets(256, gpu=False) == [1, 8, 16, 32, 64, 128, 256]
    assert default_buckets(8, gpu=False) == [1, 8]
    assert default_buckets(2048, gpu=True) == [1, 32, 128, 512, 2048]
    assert default_buckets(1000, gpu=True) == [1, 62, 250, 1000]


# Rounds of a step's allocations: four 8 MB buffers written and freed; the page faults of each round.
ROUNDS = """
import ctypes, resource, sys
from splitfuse.compiled import runner
if sys.argv[1] == "keep":
    runner.keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffers = [libc.malloc(8 << 20) for _ in range(4)]
    for b in buffers:
        ctypes.memset(b, 1, 8 << 20)
    for b in buffers:
        libc.free(b)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)
"""


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallopt"), reason="the C library has no mallopt (not glibc)")
def test_a_cpu_runner_keeps_freed_memory_for_the_next_step():
    """The rounds after the first reuse the pages the first faulted in (8192 of 4 KB); by default glibc hands
    them back to the system and every round faults them in again."""
    def rounds(how: str) -> list[int]:
        out = subprocess.run([sys.executable, "-P", "-c", ROUNDS, how], capture_output=True, text=True, check=True)
        return [int(n) for n in out.stdout.split()]

    kept, default = rounds("keep"), rounds("default")
    assert kept[0] > 8000 and max(kept[1:]) < 100, kept
    assert min(default) > 8000, default


def make_runner(path, **kw) -> ModelRunner:
    model = load_model(path, torch.float32, torch.device("cpu"))
    return ModelRunner(model, num_blocks=32, block_size=16, max_num_seqs=4, max_model_len=128, buckets=[8, 32],
                       compile=kw.pop("compile", False), **kw)


def test_a_cpu_runner_sets_the_allocator_so(make_checkpoint, monkeypatch):
    calls = []
    monkeypatch.setattr(runner_module, "keep_freed_memory", lambda: calls.append(True))
    make_runner(make_checkpoint("llama"))
    assert calls == [True]


def test_padding_layout_and_buffer_reuse(make_checkpoint):
    runner = make_runner(make_checkpoint("llama"))
    static = {name: getattr(runner._static, name).data_ptr() for name in ("input_ids", "slot_mapping")}
    chunks = [SequenceChunk([5, 6, 7], 0, [3], True), SequenceChunk([9], 20, [1, 2], True)]
    assert runner.bucket_for(4) == 8 and runner.bucket_for(9) == 32 and runner.seqs_in_bucket(8) == 4
    logits = runner.execute(chunks)
    view = runner._views[8]
    assert logits.shape == (2, 128)
    assert view.input_ids.tolist() == [5, 6, 7, 9, 0, 0, 0, 0]
    assert view.positions.tolist()[:4] == [0, 1, 2, 20]
    # Slots: block 3 offsets 0..2, then position 20 = block table [1, 2] entry 1, offset 4. Padding is -1.
    assert view.slot_mapping.tolist() == [48, 49, 50, 36, -1, -1, -1, -1]
    assert view.query_start_loc.tolist() == [0, 3, 4, 4, 4]  # padded sequences have query length 0
    assert view.seq_lens.tolist() == [3, 21, 0, 0]
    assert view.logits_indices.tolist() == [2, 3, -1, -1]  # padding rows: -1, attending to nothing
    assert view.block_tables[1, :2].tolist() == [1, 2]
    # The next step reuses the same static storage, so captured graphs see new inputs.
    runner.execute([SequenceChunk([1], 3, [3], True)])
    assert {name: getattr(runner._static, name).data_ptr() for name in static} == static
    assert runner._views[8].slot_mapping.tolist() == [51] + [-1] * 7


def test_padding_never_changes_logits(make_checkpoint):
    """The same sequence gives the same logits whether its step is padded to 8 or to 32 tokens."""
    runner = make_runner(make_checkpoint("qwen2"))
    small = runner.execute([SequenceChunk(list(range(1, 8)), 0, [0], True)])
    padded_more = runner.execute([SequenceChunk(list(range(1, 8)), 0, [1], True),
                                  SequenceChunk(list(range(10, 30)), 0, [2, 3], False)])
    torch.testing.assert_close(small, padded_more[:1], atol=1e-5, rtol=1e-5)


def workload(engine: Engine, vocab: int) -> dict[str, list[int]]:
    """Prompts of 1 to 100 tokens, 1 to 12 at once, arriving while others generate."""
    g = torch.Generator().manual_seed(0)
    out: dict[str, list[int]] = {}
    for wave, count in enumerate([1, 12, 5]):
        for i in range(count):
            n = int(torch.randint(1, 100, (1,), generator=g))
            engine.add_request(f"{wave}-{i}", torch.randint(0, vocab, (n,), generator=g).tolist(),
                               SamplingParams(max_new_tokens=6, ignore_eos=True))
        for _ in range(3):
            for o in engine.step():
                out.setdefault(o.id, []).extend(o.token_ids)
    while engine.has_unfinished():
        for o in engine.step():
            out.setdefault(o.id, []).extend(o.token_ids)
    return out


@pytest.fixture
def fresh_compile(make_checkpoint):
    """Engine options for a tiny Llama, its eager tokens on `workload`, and dynamo's counters reset."""
    options = dict(model=str(make_checkpoint("llama")), device="cpu", dtype="float32", token_budget=64,
                   max_num_seqs=16, num_blocks=128, buckets=[1, 16, 64])
    eager = workload(Engine(EngineConfig(**options, eager=True)), 128)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    return options, eager


def test_compiled_equals_eager_and_compiles_one_graph(fresh_compile):
    options, eager = fresh_compile
    compiled = workload(Engine(EngineConfig(**options, background_compile=False), progress=False), 128)
    assert compiled == eager and len(compiled) == 18
    # One graph of dynamic sizes for buckets 1, 16 and 64; none while serving.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_serves_while_compiling_in_the_background(fresh_compile):
    """Steps run eagerly while the buckets compile (a process of its own fills the cache, then a thread of
    this one loads it), then compiled; the same tokens either way, and still one graph. The compiler waits
    for the engine's first idle moment, so the first answers do not share the interpreter with it."""
    options, eager = fresh_compile
    engine = Engine(EngineConfig(**options), progress=False)
    engine.add_request("first", [1, 2, 3], SamplingParams(max_new_tokens=2, ignore_eos=True))
    engine.step()
    time.sleep(1)
    assert torch._dynamo.utils.counters["frames"]["total"] == 0  # busy so far: nothing traced
    engine.abort("first")
    engine.step()
    assert workload(engine, 128) == eager
    assert engine.runner.compiled.wait(timeout=600)
    assert engine.runner._forward is engine.runner._compiled
    assert workload(engine, 128) == eager
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
