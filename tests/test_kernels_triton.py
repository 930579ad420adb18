"""The Triton kernels against the torch reference: on the GPU where there is one, else on CPU through
Triton's interpreter (conftest.py chooses); compiled for GPU targets without a GPU, which catches what
the interpreter accepts and the compiler does not; and inside a whole model's forward."""
import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

from splitfuse.compiled.loader import load_model
from splitfuse.compiled.runner import ModelRunner, SequenceChunk
from splitfuse.kernels import attention, ops, reference
from splitfuse.kernels.kv_store import store_kv_triton

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (without one the kernels "
                          "run in Triton's interpreter, with fp32 dots, in the other tests)")
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def make_batch(q_lens, ctx_lens, *, hq=4, hkv=2, d=16, block_size=16, dtype=torch.float32,
               extra_rows=0, fill=None, seed=0):
    """A ragged batch over a random block pool. Sequence s has q_lens[s] new tokens at the end of a
    context of ctx_lens[s] tokens, all written through reference.store_kv. The rest of the pool (the
    tails of last blocks, blocks listed past a sequence's context) keeps `fill` or random data."""
    g = torch.Generator().manual_seed(seed)
    S = len(q_lens)
    max_blocks = max(1, max(-(-c // block_size) for c in ctx_lens))
    num_blocks = S * max_blocks + 3
    shape = (num_blocks, block_size, hkv, d)
    k_cache = torch.randn(shape, generator=g).to(dtype)
    v_cache = torch.randn(shape, generator=g).to(dtype)
    if fill is not None:
        k_cache.fill_(fill)
        v_cache.fill_(fill)
    # Block 0 is never handed out, so in the NaN-filled pool it is always uninitialised.
    block_tables = (torch.randperm(num_blocks - 1, generator=g)[:S * max_blocks] + 1).view(S, max_blocks).int()

    slots = [int(block_tables[s, p // block_size]) * block_size + p % block_size
             for s, c in enumerate(ctx_lens) for p in range(c)]
    slots += [-1, -1]  # padded tokens are skipped
    n = len(slots)
    reference.store_kv(torch.randn(n, hkv, d, generator=g), torch.randn(n, hkv, d, generator=g),
                       k_cache, v_cache, torch.tensor(slots))

    starts = [0]
    for ql in q_lens:
        starts.append(starts[-1] + ql)
    q = torch.randn(starts[-1] + extra_rows, hq, d, generator=g).to(dtype)
    return tuple(t.to(DEVICE) for t in (q, k_cache, v_cache, block_tables, torch.tensor(ctx_lens, dtype=torch.int32),
                                        torch.tensor(starts, dtype=torch.int32)))


def check(batch, window=0, scale=None):
    q = batch[0]
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    out = attention.paged_attention_triton(*batch, scale, window)
    ref = reference.paged_attention(*batch, scale, window)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all()
    tol = TOL[q.dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    return out


@pytest.mark.parametrize("hq,hkv", [(6, 2), (4, 4)])
@pytest.mark.parametrize("block_size", [16, 32])
def test_block_boundaries(hq, hkv, block_size):
    # Decodes whose contexts end exactly at, just before and just past a block boundary, and chunks
    # that start or end on one.
    q_lens = [1, 1, 1, 1, 16, 7, 1]
    ctx_lens = [16, 32, 33, 31, 32, 33, 1]
    check(make_batch(q_lens, ctx_lens, hq=hq, hkv=hkv, block_size=block_size))


@pytest.mark.parametrize("window", [1, 5, 16, 40])
def test_sliding_window(window):
    # Windows smaller than, equal to and larger than a block; a long chunk so rows of one tile see
    # different windows (some rows see no key in early blocks); decodes whose window starts just
    # before / exactly at a block and a 64-key tile boundary.
    ctx_lens = [70, 60, 20, 9, 31 + window, 32 + window, 63 + window, 64 + window]
    check(make_batch([1, 40, 3, 1, 1, 1, 1, 1], ctx_lens, hq=6, hkv=2), window=window)


def test_padding():
    # Padded sequences (query length 0) between real ones, and padded rows past query_start_loc[-1].
    batch = make_batch([0, 1, 0, 5, 0], [0, 20, 0, 8, 0], extra_rows=7)
    out = check(batch)
    assert (out[6:] == 0).all()


def test_all_padding():
    out = check(make_batch([0, 0], [0, 0], extra_rows=4))
    assert (out == 0).all()


@pytest.mark.parametrize("splits", [1, 4])
def test_uninitialised_cache_is_never_read(monkeypatch, splits):
    # NaN everywhere outside the written contexts: any unmasked read would poison the kernel's output.
    # The torch reference may read (and mask) such slots, so it assumes a finite cache, as the
    # runner's zero-initialised one is: it gets the same cache with NaN replaced by zeros.
    for window in (0, 6):
        batch = make_batch([1, 1, 9, 1], [3, 17, 40, 50], hq=6, hkv=2, fill=float("nan"))
        fill_to_splits(monkeypatch, batch, splits)
        out = attention.paged_attention_triton(*batch, batch[0].shape[-1] ** -0.5, window)
        finite = (batch[0], batch[1].nan_to_num(0.0), batch[2].nan_to_num(0.0), *batch[3:])
        ref = reference.paged_attention(*finite, batch[0].shape[-1] ** -0.5, window)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, ref, atol=TOL[torch.float32], rtol=TOL[torch.float32])


@pytest.mark.parametrize("seed", range(10))
def test_random_ragged(seed):
    # Mix of decodes, prompt chunks with prior context, and padded sequences; head_dim 16 or 32.
    g = torch.Generator().manual_seed(100 + seed)
    q_lens, ctx_lens = [], []
    for _ in range(int(torch.randint(2, 7, (1,), generator=g))):
        kind = int(torch.randint(0, 4, (1,), generator=g))
        if kind == 0:  # padded sequence
            ql, prior = 0, 0
        elif kind == 1:  # decode
            ql, prior = 1, int(torch.randint(0, 80, (1,), generator=g))
        else:  # prompt chunk, maybe after earlier chunks
            ql, prior = int(torch.randint(2, 24, (1,), generator=g)), int(torch.randint(0, 50, (1,), generator=g))
        q_lens.append(ql)
        ctx_lens.append(prior + ql)
    hq, hkv = [(4, 4), (6, 2), (8, 1), (4, 2)][seed % 4]
    batch = make_batch(q_lens, ctx_lens, hq=hq, hkv=hkv, d=[16, 32][seed % 2], block_size=[16, 32][seed // 2 % 2],
                       extra_rows=seed % 3, seed=seed)
    check(batch, window=[0, 0, 13][seed % 3], scale=0.1 + 0.1 * seed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    check(make_batch([1, 12, 1], [40, 30, 5], hq=4, hkv=2, d=32, dtype=dtype))


@pytest.mark.parametrize("d,block_size", [(64, 64), (128, 128)])
def test_model_sizes(d, block_size):
    # Real head_dim / block sizes; D=128 in fp32 uses the smaller key tile, spanning part of a block.
    check(make_batch([1, 20, 1], [100, 150, 129], hq=4, hkv=2, d=d, block_size=block_size), window=[0, 50][d == 128])


@pytest.mark.parametrize("d", [80, 96, 12])
def test_head_dim_not_power_of_two(d):
    # OPT-2.7b / Phi-2 (80) and several Qwen sizes (96) pad D to 128 with masks; 12 pads to a 16-wide dot.
    check(make_batch([1, 9, 1, 0], [40, 20, 17, 0], hq=6, hkv=2, d=d, extra_rows=2), window=[0, 7][d == 96])


def fill_to_splits(monkeypatch, batch, splits: int) -> None:
    """Make the launcher split every tile's keys `splits` ways, as it does for few long decodes on a GPU."""
    q, k_cache = batch[0], batch[1]
    base = attention.launch_geometry(q.shape[0], batch[4].numel(), q.shape[1], k_cache.shape[2], 1).grid
    monkeypatch.setattr(attention, "_programs_to_fill", lambda device: splits * base[0] * base[1])
    assert attention.launch_geometry(q.shape[0], batch[4].numel(), q.shape[1], k_cache.shape[2],
                                     attention._programs_to_fill(q.device)).grid[2] == splits


@pytest.mark.parametrize("splits,window", [(2, 0), (5, 0), (16, 0), (3, 9)])
def test_split_kv(monkeypatch, splits, window):
    # Long decodes split into segments (some empty for the short contexts), a chunk whose early
    # tiles see fewer key tiles than splits, padded sequences and padded rows.
    batch = make_batch([1, 0, 1, 13, 1], [200, 0, 3, 45, 97], hq=6, hkv=2, d=32, extra_rows=3)
    fill_to_splits(monkeypatch, batch, splits)
    out = check(batch, window=window)
    assert (out[16:] == 0).all()


def test_launch_geometry_scales_with_tokens_and_sequences():
    # A 2048-token, 256-sequence bucket of a Llama-3-8B layer (32 query heads, 8 KV heads) on an H100
    # (132 SMs): 16-row tiles of 4 tokens x 4 heads, (T // 4 + S) x 8 = 6144 programs, where the grid of
    # (sequences, 64-row tiles of the whole step, KV heads) launched 256 x 128 x 8 = 262144.
    geo = attention.launch_geometry(2048, 256, 32, 8, programs_to_fill=4 * 132)
    assert (geo.block_m, geo.block_q) == (16, 4)
    assert geo.grid == (2048 // 4 + 256, 8, 1)
    # A 16-token decode bucket leaves the GPU idle, so the keys are split; MQA packs 32 heads per tile.
    assert attention.launch_geometry(16, 16, 32, 8, 4 * 132).grid == (16 // 4 + 16, 8, 3)
    assert attention.launch_geometry(16, 16, 32, 1, 4 * 132) == attention.LaunchGeometry(1, 32, (32, 1, 16))


class Launches:
    """Stands in for a kernel: records each launch's grid and arguments, runs nothing."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


def test_one_launch_shape_per_bucket(monkeypatch):
    # Two steps of one bucket (T=64, S=6), prompt-heavy and decode-only: the same grid and constants,
    # which a captured CUDA graph replays whatever the step holds.
    launches = Launches()
    monkeypatch.setattr(attention, "_paged_attention_kernel", launches)
    monkeypatch.setattr(attention, "_programs_to_fill", lambda device: 4 * 132)
    for q_lens in ([30, 20, 1, 1, 0, 0], [1] * 6):
        batch = make_batch(q_lens, [n + 40 for n in q_lens], hq=8, hkv=2, extra_rows=64 - sum(q_lens))
        attention.paged_attention_triton(*batch, 0.1, 0)
    (grid_a, _, constants_a), (grid_b, _, constants_b) = launches.calls
    assert grid_a == grid_b == attention.launch_geometry(64, 6, 8, 2, 4 * 132).grid
    assert constants_a == constants_b


def test_rejects_bad_shapes():
    q, k, v, bt, sl, qsl = make_batch([1], [4])
    with pytest.raises(ValueError, match="equal head_dim"):
        attention.paged_attention_triton(q[..., :12], k, v, bt, sl, qsl, 1.0, 0)
    with pytest.raises(ValueError, match="Hq a multiple of Hkv"):
        attention.paged_attention_triton(q[:, :3], k, v, bt, sl, qsl, 1.0, 0)
    with pytest.raises(ValueError, match="query_start_loc"):
        attention.paged_attention_triton(q, k, v, bt, sl, qsl[:1], 1.0, 0)


# (key dtype, cache dtype). No fp32 -> bf16 case: the interpreter truncates that conversion where
# the GPU (and torch) round to nearest even, so it would differ from the reference by one ulp.
@pytest.mark.parametrize("key_dtype,cache_dtype", [(torch.float32, torch.float32),
                                                   (torch.float32, torch.float16),
                                                   (torch.bfloat16, torch.bfloat16)])
def test_store_kv(key_dtype, cache_dtype):
    g = torch.Generator().manual_seed(0)
    num_blocks, block_size, hkv, d, T = 6, 16, 2, 24, 20  # head_dim need not be a power of two here
    k_cache = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(DEVICE, cache_dtype)
    v_cache = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(DEVICE, cache_dtype)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:T].to(DEVICE)
    slots[[0, 7, 19]] = -1  # padded tokens
    # key/value as strided views of a fused projection output, like the model produces them.
    qkv = torch.randn(T, 3 * hkv * d, generator=g).to(DEVICE, key_dtype)
    key = qkv[:, hkv * d:2 * hkv * d].view(T, hkv, d)
    value = qkv[:, 2 * hkv * d:].view(T, hkv, d)
    for slot_dtype in (torch.int32, torch.int64):
        k_out, v_out = k_cache.clone(), v_cache.clone()
        store_kv_triton(key, value, k_out, v_out, slots.to(slot_dtype))
        k_ref, v_ref = k_cache.clone(), v_cache.clone()
        reference.store_kv(key, value, k_ref, v_ref, slots)
        assert torch.equal(k_out, k_ref) and torch.equal(v_out, v_ref)
    # Slots not written stay exactly as they were.
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool, device=DEVICE)
    untouched[slots[slots >= 0]] = False
    assert torch.equal(k_out.view(-1, hkv, d)[untouched], k_cache.view(-1, hkv, d)[untouched])
    assert torch.equal(v_out.view(-1, hkv, d)[untouched], v_cache.view(-1, hkv, d)[untouched])
    assert not torch.equal(k_out, k_cache)


def model_steps(vocab: int) -> list[list[SequenceChunk]]:
    """Three steps over three sequences: prompt chunks; decodes mixed with the prompts' rest; decodes."""
    g = torch.Generator().manual_seed(0)
    bounds = [(0, 5, 6, 7), (0, 11, 17, 18), (0, 20, 30, 31)]  # each sequence's tokens per step
    ids = [torch.randint(0, vocab, (b[-1],), generator=g).tolist() for b in bounds]
    tables = [[4, 1], [2, 6], [5, 3]]
    return [[SequenceChunk(ids[i][b[k]:b[k + 1]], b[k], tables[i], True) for i, b in enumerate(bounds)]
            for k in range(3)]


def run_steps(path, device, steps, compile=False, cuda_graphs=True) -> torch.Tensor:
    model = load_model(path, torch.float32, torch.device(device))
    runner = ModelRunner(model, num_blocks=8, block_size=16, max_num_seqs=4, max_model_len=64, buckets=[8, 64],
                         compile=compile, cuda_graphs=cuda_graphs)
    runner.compile(background=False, progress=False)
    return torch.cat([runner.execute(chunks).cpu() for chunks in steps])


def test_whole_model_with_triton_kernels(tiny_model, monkeypatch):
    """Each family's forward with the Triton kernels equals its CPU path, end to end (Mistral with its
    sliding window). The ops take Triton for CUDA tensors only, so without a GPU the model's layers
    call the interpreted kernels in their place."""
    family, path, hf = tiny_model
    steps = model_steps(hf.config.vocab_size)
    expected = run_steps(path, "cpu", steps)
    if DEVICE.type == "cpu":
        monkeypatch.setattr(ops, "paged_attention", lambda q, cache, layer, *rest:
                            attention.paged_attention_triton(q, *cache[layer], *rest))
        monkeypatch.setattr(ops, "store_kv", lambda k, v, cache, layer, slots: store_kv_triton(k, v, *cache[layer], slots))
    torch.testing.assert_close(run_steps(path, DEVICE, steps), expected, atol=1e-4, rtol=1e-4)


@cuda
def test_graph_replay_equals_eager(make_checkpoint):
    # Steps 1 and 2 share bucket 64: the second replays the graph captured in the first on new inputs.
    path = make_checkpoint("mistral")
    steps = model_steps(128)
    eager = run_steps(path, "cuda", steps, cuda_graphs=False)
    torch.testing.assert_close(run_steps(path, "cuda", steps, compile=True), eager, atol=1e-4, rtol=1e-4)


@cuda
@pytest.mark.parametrize("d", [64, 80, 96, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_dots_on_gpu(monkeypatch, d, dtype):
    # 16-bit tensor-core dots, which the interpreter widens to fp32, against an fp32 reference of the
    # same inputs; with the keys split as the launcher picks for this small batch, and unsplit.
    batch = make_batch([1, 1, 37, 1, 0], [300, 17, 60, 1000, 0], hq=8, hkv=2, d=d, dtype=dtype, extra_rows=3)
    ref = reference.paged_attention(*(t.float() if t.is_floating_point() else t for t in batch), d ** -0.5, 64)
    for fill in (attention._programs_to_fill, lambda device: 1):
        monkeypatch.setattr(attention, "_programs_to_fill", fill)
        out = attention.paged_attention_triton(*batch, d ** -0.5, 64)
        torch.testing.assert_close(out.float(), ref, atol=TOL[dtype], rtol=TOL[dtype])


def compile_for_nvidia_gpus() -> None:
    """Compile the wrapper's launches to cubins for a T4 (sm_75: fp16, no native bf16; split keys) and
    an H100 (sm_90: bf16) with Triton's compiler and bundled ptxas: no GPU needed. The interpreter
    runs kernels as Python; this is where what only the compiler rejects shows without a GPU."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type

    kernel = attention._paged_attention_kernel
    for capability, dtype, splits in [(75, torch.float16, 4), (90, torch.bfloat16, 1)]:
        launches = Launches()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(attention, "_paged_attention_kernel", launches)
            batch = make_batch([1, 7], [30, 9], hq=6, hkv=2, d=80, dtype=dtype)
            fill_to_splits(mp, batch, splits)
            attention.paged_attention_triton(*batch, 0.1, 0)
        _, args, constants = launches.calls[0]
        # On a GPU the dots run in the cache dtype (the launcher widens bf16 only for the interpreter).
        constants = dict(constants, DOT_DTYPE=tl.float16 if dtype == torch.float16 else tl.bfloat16)
        options = {"num_warps": constants.pop("num_warps")}
        signature = ({name: mangle_type(arg) for name, arg in zip(kernel.arg_names, args)}
                     | dict.fromkeys(constants, "constexpr"))
        triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", capability, 32),
                       options=options)


@pytest.mark.skipif("nvidia" not in triton.backends.backends, reason="this Triton has no NVIDIA backend")
def test_compiles_for_nvidia_gpus():
    # Triton interprets or compiles for a whole process (conftest.py): this runs in a child that compiles.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    child = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-4000:]


if __name__ == "__main__":
    compile_for_nvidia_gpus()


def test_without_split_kv_a_rows_bits_do_not_depend_on_the_batch(monkeypatch):
    """Deterministic engines (ops.batch_invariant): a query row gets the same bits as a decode alone, in a
    batch that a GPU would split, and in prompt chunks of any size: one program walks its keys from key 0."""
    monkeypatch.setattr(attention, "_programs_to_fill", lambda device: 64)  # a lone decode would split 16 ways
    length, hq, hkv, d = 150, 6, 2, 32
    whole = make_batch([length], [length], hq=hq, hkv=hkv, d=d)
    q, k_cache, v_cache, table = whole[:4]

    def attend(chunks):  # (start, count) of the one sequence, each as a sequence of its own
        rows = torch.cat([q[s:s + n] for s, n in chunks])
        starts = torch.tensor([0, *torch.tensor([n for _, n in chunks]).cumsum(0).tolist()], dtype=torch.int32)
        lens = torch.tensor([s + n for s, n in chunks], dtype=torch.int32)
        return attention.paged_attention_triton(rows, k_cache, v_cache, table.expand(len(chunks), -1).contiguous(),
                                                lens.to(DEVICE), starts.to(DEVICE), 0.2, 0, split_kv=False)

    full = attend([(0, length)])
    torch.testing.assert_close(full, reference.paged_attention(*whole, 0.2, 0), atol=TOL[q.dtype], rtol=TOL[q.dtype])
    for chunks in ([(0, 40), (40, 17), (57, 1), (58, 92)], [(p, 1) for p in range(0, length, 7)], [(149, 1)],
                   [(130, 1)]):
        for (start, count), out in zip(chunks, attend(chunks).split([n for _, n in chunks])):
            assert torch.equal(out, full[start:start + count])
    assert attention.launch_geometry(1, 1, hq, hkv, 64).grid[2] == 16  # the split the flag turned off


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_invariant_linear_gives_a_row_the_same_bits_at_any_row_count(dtype):
    """kernels/matmul.py, the GPU linear of deterministic engines: against fp64, and row by row across counts."""
    from splitfuse.kernels.matmul import linear_triton
    g = torch.Generator().manual_seed(0)
    x = torch.randn(130, 96, generator=g).to(dtype).to(DEVICE)
    weight = (torch.randn(72, 96, generator=g) / 10).to(dtype).to(DEVICE)
    bias = torch.randn(72, generator=g).to(dtype).to(DEVICE)
    whole = linear_triton(x, weight, bias, fp32_out=True)
    expected = torch.nn.functional.linear(x.double(), weight.double(), bias.double())
    torch.testing.assert_close(whole.double(), expected, atol=1e-4, rtol=1e-4)
    assert linear_triton(x, weight, bias).dtype == dtype
    for rows in (1, 3, 64, 65):
        assert torch.equal(linear_triton(x[-rows:], weight, bias, fp32_out=True), whole[-rows:]), rows
