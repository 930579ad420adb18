"""The Triton kernels against the torch reference, on CPU through Triton's interpreter."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any import of triton

import pytest
import torch

from splitfuse.kernels import reference
from splitfuse.kernels.attention import paged_attention_triton
from splitfuse.kernels.kv_store import store_kv_triton

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
    return (q, k_cache, v_cache, block_tables, torch.tensor(ctx_lens, dtype=torch.int32),
            torch.tensor(starts, dtype=torch.int32))


def check(batch, window=0, scale=None):
    q = batch[0]
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    out = paged_attention_triton(*batch, scale, window)
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


def test_uninitialised_cache_is_never_read():
    # NaN everywhere outside the written contexts: any unmasked read would poison the kernel's output.
    # The torch reference may read (and mask) such slots, so it assumes a finite cache, as the
    # runner's zero-initialised one is: it gets the same cache with NaN replaced by zeros.
    for window in (0, 6):
        batch = make_batch([1, 1, 9, 1], [3, 17, 40, 50], hq=6, hkv=2, fill=float("nan"))
        out = paged_attention_triton(*batch, batch[0].shape[-1] ** -0.5, window)
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


def test_rejects_bad_shapes():
    q, k, v, bt, sl, qsl = make_batch([1], [4])
    with pytest.raises(ValueError, match="head_dim"):
        paged_attention_triton(q[..., :12], k[..., :12], v[..., :12], bt, sl, qsl, 1.0, 0)
    with pytest.raises(ValueError, match="Hq a multiple of Hkv"):
        paged_attention_triton(q[:, :3], k, v, bt, sl, qsl, 1.0, 0)
    with pytest.raises(ValueError, match="query_start_loc"):
        paged_attention_triton(q, k, v, bt, sl, qsl[:1], 1.0, 0)


# (key dtype, cache dtype). No fp32 -> bf16 case: the interpreter truncates that conversion where
# the GPU (and torch) round to nearest even, so it would differ from the reference by one ulp.
@pytest.mark.parametrize("key_dtype,cache_dtype", [(torch.float32, torch.float32),
                                                   (torch.float32, torch.float16),
                                                   (torch.bfloat16, torch.bfloat16)])
def test_store_kv(key_dtype, cache_dtype):
    g = torch.Generator().manual_seed(0)
    num_blocks, block_size, hkv, d, T = 6, 16, 2, 24, 20  # head_dim need not be a power of two here
    k_cache = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(cache_dtype)
    v_cache = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(cache_dtype)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:T]
    slots[[0, 7, 19]] = -1  # padded tokens
    # key/value as strided views of a fused projection output, like the model produces them.
    qkv = torch.randn(T, 3 * hkv * d, generator=g).to(key_dtype)
    key = qkv[:, hkv * d:2 * hkv * d].view(T, hkv, d)
    value = qkv[:, 2 * hkv * d:].view(T, hkv, d)
    for slot_dtype in (torch.int32, torch.int64):
        k_out, v_out = k_cache.clone(), v_cache.clone()
        store_kv_triton(key, value, k_out, v_out, slots.to(slot_dtype))
        k_ref, v_ref = k_cache.clone(), v_cache.clone()
        reference.store_kv(key, value, k_ref, v_ref, slots)
        assert torch.equal(k_out, k_ref) and torch.equal(v_out, v_ref)
    # Slots not written stay exactly as they were.
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[slots[slots >= 0]] = False
    assert torch.equal(k_out.view(-1, hkv, d)[untouched], k_cache.view(-1, hkv, d)[untouched])
    assert torch.equal(v_out.view(-1, hkv, d)[untouched], v_cache.view(-1, hkv, d)[untouched])
    assert not torch.equal(k_out, k_cache)
