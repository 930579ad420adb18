"""The CPU kernels give a row the same bits whatever else shares its call: the linears whatever the row
count, the attention whether a query row comes in a prompt chunk of any size or as a decode, alone or
among many sequences. The engine's deterministic outputs (test_deterministic.py) rest on this."""
import random

import pytest
import torch

from splitfuse.kernels import cpu, reference

DTYPES = [torch.float32, torch.bfloat16]


def context(seed: int, length: int, *, hq: int, hkv: int, dim: int, block_size: int, dtype: torch.dtype):
    """Queries for every position of one sequence of `length` and its keys and values in shuffled blocks."""
    g = torch.Generator().manual_seed(seed)
    blocks = -(-length // block_size) + 3
    kv_cache = torch.randn(1, 2, blocks, block_size, hkv, dim, generator=g).to(dtype)  # one layer's
    table = torch.randperm(blocks, generator=g).int()
    return torch.randn(length, hq, dim, generator=g).to(dtype), kv_cache, table


def attend(chunks: list[tuple[int, int]], q, kv_cache, table, window: int) -> list[torch.Tensor]:
    """One call over the chunks (start, count) of the one sequence, each as a sequence of its own."""
    rows = torch.cat([q[start:start + count] for start, count in chunks])
    starts = torch.tensor([0, *torch.tensor([c for _, c in chunks]).cumsum(0).tolist()], dtype=torch.int32)
    lens = torch.tensor([start + count for start, count in chunks], dtype=torch.int32)
    tables = table.expand(len(chunks), -1).contiguous()
    out = torch.ops.splitfuse_cpu.paged_attention(rows, kv_cache, 0, tables, lens, starts, 0.3, window)
    return list(out.split([c for _, c in chunks]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [0, 21, 300])
@pytest.mark.parametrize("shape", [dict(hq=9, hkv=3, dim=64, block_size=16), dict(hq=8, hkv=1, dim=16, block_size=32),
                                   dict(hq=4, hkv=4, dim=80, block_size=16)])
def test_a_query_row_has_the_same_bits_in_any_chunk_and_as_a_decode(shape, window, dtype):
    length = 600  # keys in several of the bf16 kernel's spans of 256
    q, *cache = context(0, length, dtype=dtype, **shape)
    kv_cache, table = cache
    assert cpu.supports(q, kv_cache)  # the C++ kernels, loaded (`make model` builds them)
    whole = attend([(0, length)], q, *cache, window)[0]
    expected = reference.paged_attention(q, *kv_cache[0], table[None], torch.tensor([length], dtype=torch.int32),
                                         torch.tensor([0, length], dtype=torch.int32), 0.3, window)
    torch.testing.assert_close(whole.float(), expected.float(), atol=2e-2, rtol=2e-2)
    rng = random.Random(1)
    for _ in range(4):  # the prompt cut into chunks of random sizes, each run in a call of its own
        start = 0
        while start < length:
            count = min(length - start, rng.choice([1, 2, 3, 5, 17, 40]))
            assert torch.equal(attend([(start, count)], q, *cache, window)[0], whole[start:start + count])
            start += count
    # Every position as a decode, all in one call: enough sequences that each is one item over all KV heads.
    decodes = attend([(p, 1) for p in range(length)], q, *cache, window)
    assert torch.equal(torch.cat(decodes), whole)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_linear_row_has_the_same_bits_at_any_row_count(dtype):
    """The packed kernel (fp32 activations) and, where the CPU has it, the brgemm kernel (bf16)."""
    from splitfuse.compiled.models.layers import packed_product
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(1000, 576, generator=g) / 24).to(dtype)
    x = torch.randn(200, 576, generator=g).to(dtype)
    packs = [reference.pack_linear_weight(weight)]
    if dtype == torch.bfloat16 and cpu.has_bf16_gemm():
        packs.append(reference.pack_brgemm_weight(weight))
    for packed in packs:
        whole = packed_product(x, packed, None, 1000)
        for rows in (1, 2, 3, 4, 5, 6, 7, 16, 63, 64, 65, 130):
            assert torch.equal(packed_product(x[-rows:], packed, None, 1000), whole[-rows:]), rows


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5, 130])
def test_a_linear_row_has_the_same_bits_whatever_the_thread_count(rows, dtype):
    """The threads share a linear's columns out as they come free (more threads than cores here, so some
    take others' work): every column is computed once, the same way, whichever thread takes it."""
    from splitfuse.compiled.models.layers import packed_product
    g = torch.Generator().manual_seed(rows)
    weight = (torch.randn(2 * 1000, 576, generator=g) / 24).to(dtype)
    x = torch.randn(rows, 576, generator=g).to(dtype)
    packs = [(reference.pack_linear_weight(weight[:1000]), False),
             (reference.interleave_panels(reference.pack_linear_weight(weight[:1000]),
                                          reference.pack_linear_weight(weight[1000:])), True)]
    if dtype == torch.bfloat16 and cpu.has_bf16_gemm():
        gate, up = reference.pack_brgemm_weight(weight[:1000]), reference.pack_brgemm_weight(weight[1000:])
        packs += [(gate, False), (torch.cat([gate, up]), True)]
    threads = torch.get_num_threads()
    try:
        for packed, gated in packs:
            torch.set_num_threads(1)
            alone = packed_product(x, packed, None, 1000, gated)
            for count in (2, 3, 5):
                torch.set_num_threads(count)
                for _ in range(3):
                    assert torch.equal(packed_product(x, packed, None, 1000, gated), alone), (count, gated)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not cpu.has_bf16_gemm(), reason="the brgemm kernel needs AVX-512 BF16 or AMX")
@pytest.mark.parametrize("gated", [False, True])
def test_a_linear_over_more_rows_than_l2_holds_goes_pass_by_pass_with_the_same_bits(gated):
    """x of 9 MB: the brgemm kernel takes its rows in passes that fit the L2 (on any L2 up to 8 MB), and 96
    outputs make three half chunks a pass, so that the threads' pieces run across passes. Every row is
    computed once (fp64), with the bits it gets alone."""
    from splitfuse.compiled.models.layers import packed_product
    g = torch.Generator().manual_seed(1)
    weight = (torch.randn(2 * 96, 4096, generator=g) / 64).bfloat16()
    x = torch.randn(1100, 4096, generator=g).bfloat16()
    packed = (torch.cat([reference.pack_brgemm_weight(weight[:96]), reference.pack_brgemm_weight(weight[96:])])
              if gated else reference.pack_brgemm_weight(weight[:96]))
    whole = packed_product(x, packed, None, 96, gated)
    xd, wd = x.double(), weight.double()
    expected = torch.nn.functional.silu(xd @ wd[:96].T) * (xd @ wd[96:].T) if gated else xd @ wd[:96].T
    torch.testing.assert_close(whole.double(), expected, atol=0.02, rtol=0.02)
    for rows in (1, 70):
        assert torch.equal(packed_product(x[-rows:], packed, None, 96, gated), whole[-rows:]), rows
