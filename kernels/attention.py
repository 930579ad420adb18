"""Triton paged attention over the blocked KV cache for a whole mixed batch in one launch
(prompt chunks and decode tokens alike); semantics: reference.paged_attention.

Grid (sequence, query tile, kv head). A program takes BLOCK_Q new tokens of its sequence times the
GROUPS query heads sharing its kv head, as BLOCK_M = BLOCK_Q * GROUPS (padded to a power of two)
rows, so each K/V block is read once per GQA group. It walks the sequence's context BLOCK_N keys at a
time, each key finding its cache block through the block table (so BLOCK_N need not equal the
block size, which keeps the tiles small for block_size 128), with an fp32 online softmax.
The grid depends only on tensor shapes, never on values, so the launch can be CUDA-graph captured:
every sequence gets the worst-case cdiv(T, BLOCK_Q) tiles and tiles past its query length exit.
"""
import torch
import triton
import triton.language as tl

_BLOCK_M = 64  # query rows (tokens x heads of a group) per program
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _paged_attention_kernel(
        q, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc,
        scale_log2e, sliding_window,
        stride_qt, stride_qh, stride_qd,
        stride_ot, stride_oh, stride_od,
        stride_cb, stride_cs, stride_ch, stride_cd,
        stride_bs, stride_bb,
        GROUPS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    seq = tl.program_id(0)
    tile = tl.program_id(1)
    kv_head = tl.program_id(2)

    q_start = tl.load(query_start_loc + seq)
    q_len = tl.load(query_start_loc + seq + 1) - q_start
    if tile * BLOCK_Q >= q_len:  # past this sequence's tokens (or a padded sequence): nothing to do
        return
    ctx = tl.load(seq_lens + seq)

    # Row r is new token tok (of this tile) under query head `head` of this kv head's group.
    r = tl.arange(0, BLOCK_M)
    tok = tile * BLOCK_Q + r // GROUPS
    head = kv_head * GROUPS + r % GROUPS
    row_ok = (r < BLOCK_Q * GROUPS) & (tok < q_len)
    q_pos = ctx - q_len + tok  # new tokens sit at the end of the context
    # Sliding window: keys must be > q_pos - window; without one, every key >= 0 passes.
    win_lo = tl.where(sliding_window > 0, q_pos - sliding_window, -1)

    d = tl.arange(0, HEAD_DIM)
    n = tl.arange(0, BLOCK_N)
    q_rows = (q_start + tok)[:, None]
    qv = tl.load(q + q_rows * stride_qt + head[:, None] * stride_qh + d[None, :] * stride_qd,
                 mask=row_ok[:, None], other=0.0).to(DOT_DTYPE)

    # Keys this tile can see: up to its last token's position (causal), from its first token's window.
    first_pos = ctx - q_len + tile * BLOCK_Q
    hi = ctx - q_len + tl.minimum(tile * BLOCK_Q + BLOCK_Q, q_len)  # exclusive, <= ctx
    lo = tl.where(sliding_window > 0, tl.maximum(first_pos - sliding_window + 1, 0), 0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for kv_tile in range(lo // BLOCK_N, tl.cdiv(hi, BLOCK_N)):
        k_pos = kv_tile * BLOCK_N + n
        kv_ok = k_pos < hi  # never read slots, or block table entries, past the context
        # int64: block * stride can exceed 2**31 in a large cache.
        block_id = tl.load(block_tables + seq * stride_bs + (k_pos // BLOCK_SIZE) * stride_bb,
                           mask=kv_ok, other=0).to(tl.int64)
        kv_offs = (block_id[:, None] * stride_cb + (k_pos % BLOCK_SIZE)[:, None] * stride_cs
                   + kv_head * stride_ch + d[None, :] * stride_cd)
        k = tl.load(k_cache + kv_offs, mask=kv_ok[:, None], other=0.0).to(DOT_DTYPE)
        s = tl.dot(qv, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2e  # log2 domain for exp2
        keep = kv_ok[None, :] & (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] > win_lo[:, None])
        s = tl.where(keep, s, float("-inf"))

        # Online softmax. A row may have seen no key yet (window/causal/padding), so its max is -inf:
        # subtract 0 instead to avoid exp2(-inf - -inf) = NaN; its p and alpha are then 0.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache + kv_offs, mask=kv_ok[:, None], other=0.0).to(DOT_DTYPE)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision=DOT_PRECISION)
        m_i = m_new

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out + q_rows * stride_ot + head[:, None] * stride_oh + d[None, :] * stride_od,
             o.to(out.dtype.element_ty), mask=row_ok[:, None])


def paged_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                           scale: float, sliding_window: int) -> torch.Tensor:
    """Ragged causal attention of q [T, Hq, D] over the blocked cache; see kernels/reference.py.
    Requires head_dim to be a power of two >= 16. Rows past query_start_loc[-1] are 0."""
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError(f"expected q [T, Hq, D] and k/v caches [num_blocks, block_size, Hkv, D] of one layout, "
                         f"got q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
    T, Hq, D = q.shape
    _, block_size, Hkv, Dk = k_cache.shape
    if Dk != D or Hq % Hkv != 0:
        raise ValueError(f"q heads/head_dim ({Hq}, {D}) incompatible with cache's ({Hkv}, {Dk}): "
                         "need equal head_dim and Hq a multiple of Hkv")
    if D < 16 or D & (D - 1):
        raise ValueError(f"head_dim must be a power of two >= 16 (a tl.dot tile), got {D}")
    if k_cache.dtype not in _TL_DTYPES:
        raise ValueError(f"unsupported cache dtype {k_cache.dtype}; expected one of {list(_TL_DTYPES)}")
    S = seq_lens.numel()
    if query_start_loc.numel() != S + 1 or block_tables.dim() != 2 or block_tables.shape[0] != S:
        raise ValueError(f"need seq_lens [S], query_start_loc [S+1], block_tables [S, max_blocks]; got "
                         f"{tuple(seq_lens.shape)}, {tuple(query_start_loc.shape)}, {tuple(block_tables.shape)}")

    out = torch.zeros_like(q)
    groups = Hq // Hkv
    block_m = max(_BLOCK_M, triton.next_power_of_2(groups))
    block_q = block_m // groups  # new tokens per program
    if T == 0 or S == 0:
        return out
    # Dots run in the cache dtype (tensor cores). Exception: Triton's CPU interpreter (the only way a
    # CPU tensor gets here) stores bf16 as raw uint16 and its tl.dot multiplies those bits as integers,
    # so there bf16 operands are widened to fp32 first.
    dot_dtype = _TL_DTYPES[k_cache.dtype]
    if k_cache.dtype == torch.bfloat16 and k_cache.device.type == "cpu":
        dot_dtype = tl.float32
    grid = (S, triton.cdiv(T, block_q), Hkv)  # shapes only: CUDA-graph safe
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc,
        scale * 1.4426950408889634, sliding_window,  # scale * log2(e): softmax via exp2
        *q.stride(), *out.stride(), *k_cache.stride(), *block_tables.stride(),
        # Key tile: 64 keys, 32 for fp32 with D >= 128 to bound registers and shared memory.
        GROUPS=groups, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=32 if k_cache.element_size() * D >= 512 else 64,
        BLOCK_SIZE=block_size, HEAD_DIM=D,
        # fp32 dots in full precision (not TF32) so fp32 matches the reference; ignored for 16-bit.
        DOT_DTYPE=dot_dtype, DOT_PRECISION="ieee" if dot_dtype == tl.float32 else "tf32",
        num_warps=8 if D >= 128 else 4)
    return out
