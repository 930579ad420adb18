"""What a GPU worker does before and around its steps, checked on CPU with torch.cuda mocked: the
replica's device made current before loading, the KV cache sized after a profiling forward, and one
host-to-device copy per step. The same on a real GPU where one is present."""
import types

import pytest
import torch

from splitfuse.compiled import runner as runner_module
from splitfuse.compiled.loader import load_model
from splitfuse.compiled.runner import ModelRunner, SequenceChunk, kv_cache_bytes_per_block
from splitfuse.config import EngineConfig
from splitfuse.worker import engine as engine_module
from splitfuse.worker.engine import CUDA_OVERHEAD_BYTES, Engine, _blocks_for_memory

GIB = 1 << 30
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class Loaded(Exception):
    """Stops the engine's start-up once the model is being loaded."""


@pytest.mark.parametrize("device, current", [("cuda:1", 1), ("cuda", 0)])
def test_the_replicas_device_is_current_before_the_model_loads(make_checkpoint, monkeypatch, device, current):
    calls = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", torch.device(d))))

    def load(path, dtype, on, shard):
        calls.append(("load", on))
        raise Loaded
    monkeypatch.setattr(engine_module, "load_model", load)
    with pytest.raises(Loaded):
        Engine(EngineConfig(model=str(make_checkpoint("llama")), device=device, dtype="float32"), progress=False)
    assert calls == [("set_device", torch.device("cuda", current)), ("load", torch.device("cuda", current))]


class FakeCuda:
    """torch.cuda's memory queries for one device: `total` bytes, `used_by_others` taken by other
    processes; the profiling forward adds `activations` bytes at its peak on top of the weights."""

    def __init__(self, monkeypatch, total, weights, activations, used_by_others=0):
        self.total, self.weights, self.activations, self.others = total, weights, activations, used_by_others
        self.peak = None
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(total_memory=total))
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: weights)
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: setattr(self, "peak", weights))
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: self.peak)
        # What the caching allocator keeps reserved after the profile counts as used.
        monkeypatch.setattr(torch.cuda, "mem_get_info",
                            lambda d: (total - used_by_others - (self.peak or weights), total))

    def profile(self):
        assert self.peak == self.weights, "the peak is reset before the profiling forward"
        self.peak = self.weights + self.activations


@pytest.fixture(scope="module")
def model(make_checkpoint):
    return load_model(make_checkpoint("llama"), torch.float32, torch.device("cpu"))


def blocks(model, fake, replicas=1, **options):
    config = EngineConfig(**options).for_device(gpu=True)
    return _blocks_for_memory(model, config, torch.float32, torch.device("cuda", 0), fake.profile, replicas)


def test_kv_gets_the_utilisation_of_total_memory_less_weights_activations_graphs_and_overhead(model, monkeypatch):
    fake = FakeCuda(monkeypatch, total=80 * GIB, weights=16 * GIB, activations=2 * GIB)
    per_block = kv_cache_bytes_per_block(model, 16, torch.float32)
    expected = 0.9 * 80 * GIB - 16 * GIB - 2 * GIB - 2 * GIB - CUDA_OVERHEAD_BYTES
    assert blocks(model, fake) == int(expected) // per_block
    # Eager: no CUDA graphs, so no graph pool to leave room for.
    assert blocks(model, fake, eager=True) == int(expected + 2 * GIB) // per_block
    assert blocks(model, fake, gpu_memory_utilization=0.5) == int(expected - 0.4 * 80 * GIB) // per_block


def test_replicas_sharing_a_device_split_its_share_of_total_memory(model, monkeypatch):
    """Two replicas on one GPU each get half of 90% of its total memory, both while the other has not
    loaded yet (when all of it is free) and after: neither takes the fraction of the same free memory."""
    per_block = kv_cache_bytes_per_block(model, 16, torch.float32)
    expected = int(0.45 * 80 * GIB - 16 * GIB - 2 * 2 * GIB - CUDA_OVERHEAD_BYTES) // per_block
    first = blocks(model, FakeCuda(monkeypatch, total=80 * GIB, weights=16 * GIB, activations=2 * GIB), replicas=2)
    other = 16 * GIB + 2 * GIB + expected * per_block  # the first replica, loaded, profiled, KV allocated
    second = blocks(model, FakeCuda(monkeypatch, total=80 * GIB, weights=16 * GIB, activations=2 * GIB,
                                    used_by_others=other), replicas=2)
    assert first == second == expected
    assert 2 * (16 * GIB + 2 * 2 * GIB + expected * per_block) <= 0.9 * 80 * GIB


def test_kv_never_takes_more_than_is_free_and_a_full_device_is_a_clear_error(model, monkeypatch):
    per_block = kv_cache_bytes_per_block(model, 16, torch.float32)
    fake = FakeCuda(monkeypatch, total=80 * GIB, weights=16 * GIB, activations=2 * GIB, used_by_others=50 * GIB)
    assert blocks(model, fake) == int(80 * GIB - 50 * GIB - 18 * GIB - 2 * GIB - CUDA_OVERHEAD_BYTES) // per_block
    fake = FakeCuda(monkeypatch, total=24 * GIB, weights=16 * GIB, activations=4 * GIB)
    with pytest.raises(ValueError, match="raise gpu_memory_utilization, lower token_budget, or set num_blocks"):
        blocks(model, fake)


def test_cpu_keeps_its_share_of_ram(model, monkeypatch):
    monkeypatch.setattr(engine_module.os, "sysconf", lambda name: {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 2**22}[name])
    per_block = kv_cache_bytes_per_block(model, 16, torch.float32)
    assert _blocks_for_memory(model, EngineConfig(), torch.float32, torch.device("cpu"), None) == \
        int(16 * GIB * 0.1) // per_block


def test_the_profiling_forward_runs_the_largest_bucket_and_writes_no_kv(model, monkeypatch):
    runner = ModelRunner(model, num_blocks=1, block_size=16, max_num_seqs=4, max_model_len=64, buckets=[8, 32],
                         compile=False, cuda_graphs=False)
    seen, forward = [], model.forward
    monkeypatch.setattr(model, "forward", lambda batch, kv: seen.append(batch.input_ids.shape[0]) or forward(batch, kv))
    runner.profile()
    assert seen == [32] and not runner.kv_cache.any()


def test_a_step_fills_one_int32_buffer_and_on_cpu_copies_nothing(model, monkeypatch):
    runner = ModelRunner(model, num_blocks=8, block_size=16, max_num_seqs=4, max_model_len=64, buckets=[8, 32],
                         compile=False, cuda_graphs=False)
    fields = [getattr(runner._static, name) for name in runner._static.__dataclass_fields__]
    host = runner._buffers.host
    assert all(t.dtype == torch.int32 and t.untyped_storage().data_ptr() == host.untyped_storage().data_ptr()
               for t in fields)
    copies = []
    real_copy = torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, *a, **k: copies.append(self) or real_copy(self, *a, **k))
    logits = runner.execute([SequenceChunk([5, 6, 7], 0, [3], True), SequenceChunk([9], 20, [1, 2], True)])
    assert logits.shape == (2, 128) and copies == []


class FakeEvent:
    def __init__(self):
        self.recorded = 0

    def record(self):
        self.recorded += 1

    def synchronize(self):
        pass


def test_on_cuda_a_step_is_one_copy_of_the_rows_it_uses(monkeypatch):
    """The CUDA path with a CPU tensor standing in for the device buffer: one copy per step, of the
    fields and of the block-table rows of the step's sequences only."""
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    real_zeros = torch.zeros
    monkeypatch.setattr(runner_module.torch, "zeros",
                        lambda *a, pin_memory=False, device=None, **k: real_zeros(*a, **k))
    buffers = runner_module._StepBuffers(8, 4, 5, torch.device("cuda", 0))
    assert buffers.on_device is not buffers.host
    copies = []
    real_copy = torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, src, **k: copies.append((self, src, k))
                        or real_copy(self, src))
    buffers.fill([SequenceChunk([5, 6, 7], 0, [3], True), SequenceChunk([9], 20, [1, 2], True)], 8, 4, 16)
    buffers.copy(2)
    assert len(copies) == 1 and copies[0][2] == {"non_blocking": True} and buffers._copied.recorded == 1
    # tokens x3, logits rows (up to one per token), sequences x2 (+1), two table rows
    assert copies[0][0].numel() == 3 * 8 + 8 + 5 + 4 + 2 * 5
    assert buffers.batch.slot_mapping.tolist() == [48, 49, 50, 36, -1, -1, -1, -1]
    assert buffers.batch.block_tables[:2, :2].tolist() == [[3, 0], [1, 2]]


@cuda_only
def test_on_a_gpu_the_host_buffer_is_pinned_and_a_step_is_one_copy(make_checkpoint, monkeypatch):
    model = load_model(make_checkpoint("llama"), torch.float32, torch.device("cuda"))
    runner = ModelRunner(model, num_blocks=8, block_size=16, max_num_seqs=4, max_model_len=64,
                         buckets=[8, 32], compile=False, cuda_graphs=False)
    assert runner._buffers.host.is_pinned() and runner._buffers.on_device.is_cuda
    copies = []
    real_copy = torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, *a, **k: copies.append(self) or real_copy(self, *a, **k))
    runner.execute([SequenceChunk([5, 6, 7], 0, [3], True)])
    assert len(copies) == 1
    assert runner._views[8].slot_mapping.tolist() == [48, 49, 50] + [-1] * 5


def test_replicas_sharing_a_device_are_counted(monkeypatch):
    """The worker tells its engine how many replicas share its GPU: round-robin over the visible
    GPUs for auto/cuda, all of them for one named device, one each on the CPU."""
    from splitfuse.worker.main import replicas_sharing
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [replicas_sharing("auto", r, 3) for r in range(3)] == [2, 1, 2]
    assert replicas_sharing("cuda:1", 0, 3) == 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert replicas_sharing("auto", 0, 3) == 3  # on the CPU; the engine ignores it there


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_replicas_serve_on_two_gpus(make_checkpoint):
    """Each replica on its own GPU (auto device, round-robin) serves requests routed to it."""
    import splitfuse
    with splitfuse.serve(str(make_checkpoint("llama")), replicas=2, eager=True, dtype="float32",
                         num_blocks=64) as deployment, splitfuse.Client(deployment.address) as client:
        replies = [client.complete([1, 2, 3, 4 + i], max_new_tokens=4, ignore_eos=True) for i in range(8)]
    assert all(r.finish_reason == "length" and len(r.token_ids) == 4 for r in replies)
