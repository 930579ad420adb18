"""Triton paged attention over the blocked KV cache for a whole mixed batch in one launch
(prompt chunks and decode tokens alike); semantics: reference.paged_attention.

Layout, after the design of vLLM's unified attention:
- A program computes one query tile: BLOCK_Q consecutive new tokens of one sequence times the GROUPS
  query heads sharing one KV head, as BLOCK_M = 16 rows (more only when GROUPS > 16). Each K/V tile
  is loaded once for the whole group, and a decode fills GROUPS of the 16 rows.
- Grid axis 0 numbers the query tiles of the whole step. Sequence s owns the tiles from
  query_start_loc[s] // BLOCK_Q + s on: these ranges are disjoint and all lie below
  T // BLOCK_Q + S, so that many programs cover any batch of the bucket. A program finds its
  sequence by a binary search over query_start_loc; one that lands past its sequence's tiles exits.
- Axis 1 is the KV head. Axis 2 splits each tile's keys into NUM_SPLITS contiguous segments
  (split-KV), each program writing an unnormalised partial (sum, max, denominator) that a small torch
  reduction combines. The launcher splits only when tiles x heads are too few to fill the GPU (a few
  long decodes); otherwise NUM_SPLITS is 1 and the kernel writes the output itself.
- Keys are walked BLOCK_N at a time, each finding its cache block through the block table (so
  BLOCK_N need not equal the block size), with an fp32 online softmax in the exp2 domain. head_dim
  is padded to a power of two (>= 16, a tl.dot tile) with masks, so 80 or 96 work.
Grid and constants depend on tensor shapes (T, S, heads, head_dim) and the device only, never on
values: one bucket has one launch shape, which a CUDA graph can capture.
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_BLOCK_M = 16  # query rows (tokens x heads of a group) per program: the smallest tl.dot tile
_MAX_SPLITS = 16
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _find_sequence(query_start_loc, num_seqs, tile, BLOCK_Q: tl.constexpr):
    """The sequence owning global query tile `tile`: the last s with query_start_loc[s] // BLOCK_Q + s <= tile."""
    lo: tl.int32 = 0
    hi: tl.int32 = num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tl.load(query_start_loc + mid) // BLOCK_Q + mid <= tile:
            lo = mid
        else:
            hi = mid - 1
    return lo


@triton.jit
def _paged_attention_kernel(
        q, k_cache, v_cache, out, part_acc, part_max, part_sum,
        block_tables, seq_lens, query_start_loc, num_seqs,
        scale_log2e, sliding_window,
        stride_qt, stride_qh, stride_qd,
        stride_ot, stride_oh, stride_od,
        stride_cb, stride_cs, stride_ch, stride_cd,
        stride_bs, stride_bb,
        stride_as, stride_at, stride_ah, stride_ms, stride_mt,
        GROUPS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr,
        DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq = _find_sequence(query_start_loc, num_seqs, tl.program_id(0), BLOCK_Q)
    q_start = tl.load(query_start_loc + seq)
    tile = tl.program_id(0) - (q_start // BLOCK_Q + seq)  # this sequence's tile number
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

    d = tl.arange(0, HEAD_DIM_PAD)
    rd_ok = row_ok[:, None] & (d < HEAD_DIM)[None, :]
    n = tl.arange(0, BLOCK_N)
    q_rows = q_start + tok
    qv = tl.load(q + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :] * stride_qd,
                 mask=rd_ok, other=0.0).to(DOT_DTYPE)

    # Keys this tile can see: up to its last token's position (causal), from its first token's window;
    # of those key tiles, this program walks its split's share.
    first_pos = ctx - q_len + tile * BLOCK_Q
    hi = ctx - q_len + tl.minimum(tile * BLOCK_Q + BLOCK_Q, q_len)  # exclusive, <= ctx
    lo = tl.where(sliding_window > 0, tl.maximum(first_pos - sliding_window + 1, 0), 0)
    end_tile = tl.cdiv(hi, BLOCK_N)
    per_split = tl.cdiv(end_tile - lo // BLOCK_N, NUM_SPLITS)
    start_tile = lo // BLOCK_N + split * per_split

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    for kv_tile in range(start_tile, tl.minimum(start_tile + per_split, end_tile)):
        k_pos = kv_tile * BLOCK_N + n
        kv_ok = k_pos < hi  # never read slots, or block table entries, past the context
        # int64: block * stride can exceed 2**31 in a large cache.
        block_id = tl.load(block_tables + seq * stride_bs + (k_pos // BLOCK_SIZE) * stride_bb,
                           mask=kv_ok, other=0).to(tl.int64)
        kv_offs = (block_id[:, None] * stride_cb + (k_pos % BLOCK_SIZE)[:, None] * stride_cs
                   + kv_head * stride_ch + d[None, :] * stride_cd)
        kd_ok = kv_ok[:, None] & (d < HEAD_DIM)[None, :]
        k = tl.load(k_cache + kv_offs, mask=kd_ok, other=0.0).to(DOT_DTYPE)
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
        v = tl.load(v_cache + kv_offs, mask=kd_ok, other=0.0).to(DOT_DTYPE)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if NUM_SPLITS == 1:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :] * stride_od,
                 o.to(out.dtype.element_ty), mask=rd_ok)
    else:  # a split with no keys still writes (max -inf, sum 0), so every split of a real row is set
        tl.store(part_acc + split * stride_as + q_rows[:, None] * stride_at + head[:, None] * stride_ah + d[None, :],
                 acc, mask=rd_ok)
        stats = split * stride_ms + q_rows * stride_mt + head
        tl.store(part_max + stats, m_i, mask=row_ok)
        tl.store(part_sum + stats, l_i, mask=row_ok)


@dataclass(frozen=True, slots=True)
class LaunchGeometry:
    block_q: int  # new tokens per program
    block_m: int  # query rows per program: block_q tokens x the query heads of one KV head
    grid: tuple[int, int, int]  # (query tiles, KV heads, key splits)


def launch_geometry(num_tokens: int, num_seqs: int, num_q_heads: int, num_kv_heads: int,
                    programs_to_fill: int) -> LaunchGeometry:
    """The launch for a bucket of T tokens and S sequences: (T // block_q + S) x Hkv x splits programs,
    from shapes alone. Splits multiply the programs up to `programs_to_fill` only when the tiles alone
    are fewer, which also bounds the fp32 partials to programs_to_fill x block_m rows."""
    groups = num_q_heads // num_kv_heads
    block_m = max(_BLOCK_M, triton.next_power_of_2(groups))
    block_q = block_m // groups
    tiles = num_tokens // block_q + num_seqs
    splits = max(1, min(_MAX_SPLITS, programs_to_fill // (tiles * num_kv_heads)))
    return LaunchGeometry(block_q, block_m, (tiles, num_kv_heads, splits))


def _programs_to_fill(device: torch.device) -> int:
    """Programs that keep the device busy: a few per SM on a GPU. Triton's interpreter (CPU) runs
    programs one after another, so there splitting only costs time."""
    if device.type != "cuda":
        return 1
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def paged_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                           scale: float, sliding_window: int, split_kv: bool = True) -> torch.Tensor:
    """Ragged causal attention of q [T, Hq, D] over the blocked cache; see kernels/reference.py.
    Rows past query_start_loc[-1] are 0. Without split_kv, one program walks all of a row's keys, tile by
    tile from key 0, as for any other row: a row's bits then do not depend on the batch (the split
    count follows the batch's shape), nor on whether it is a decode or part of a prompt chunk."""
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError(f"expected q [T, Hq, D] and k/v caches [num_blocks, block_size, Hkv, D] of one layout, "
                         f"got q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
    T, Hq, D = q.shape
    _, block_size, Hkv, Dk = k_cache.shape
    if Dk != D or Hq % Hkv != 0:
        raise ValueError(f"q heads/head_dim ({Hq}, {D}) incompatible with cache's ({Hkv}, {Dk}): "
                         "need equal head_dim and Hq a multiple of Hkv")
    if k_cache.dtype not in _TL_DTYPES:
        raise ValueError(f"unsupported cache dtype {k_cache.dtype}; expected one of {list(_TL_DTYPES)}")
    S = seq_lens.numel()
    if query_start_loc.numel() != S + 1 or block_tables.dim() != 2 or block_tables.shape[0] != S:
        raise ValueError(f"need seq_lens [S], query_start_loc [S+1], block_tables [S, max_blocks]; got "
                         f"{tuple(seq_lens.shape)}, {tuple(query_start_loc.shape)}, {tuple(block_tables.shape)}")

    out = torch.zeros_like(q)
    if T == 0 or S == 0:
        return out
    geo = launch_geometry(T, S, Hq, Hkv, _programs_to_fill(q.device) if split_kv else 1)
    splits = geo.grid[2]
    # fp32 partials of each split, zero where no program writes (padding rows): they reduce to 0.
    part_acc = q.new_zeros((splits, T, Hq, D), dtype=torch.float32) if splits > 1 else out
    part_max = q.new_zeros((splits, T, Hq), dtype=torch.float32) if splits > 1 else out
    part_sum = torch.zeros_like(part_max) if splits > 1 else out
    head_dim_pad = max(16, triton.next_power_of_2(D))
    # Dots run in the cache dtype (tensor cores). Exception: Triton's CPU interpreter (the only way a
    # CPU tensor gets here) stores bf16 as raw uint16 and its tl.dot multiplies those bits as integers,
    # so there bf16 operands are widened to fp32 first.
    dot_dtype = _TL_DTYPES[k_cache.dtype]
    if k_cache.dtype == torch.bfloat16 and k_cache.device.type == "cpu":
        dot_dtype = tl.float32
    _paged_attention_kernel[geo.grid](
        q, k_cache, v_cache, out, part_acc, part_max, part_sum,
        block_tables, seq_lens, query_start_loc, S,
        scale * 1.4426950408889634, sliding_window,  # scale * log2(e): softmax via exp2
        *q.stride(), *out.stride(), *k_cache.stride(), *block_tables.stride(),
        *part_acc.stride()[:3], *part_max.stride()[:2],
        # Key tile: 64 keys, 32 for fp32 with D >= 128 to bound registers and shared memory.
        GROUPS=Hq // Hkv, BLOCK_Q=geo.block_q, BLOCK_M=geo.block_m,
        BLOCK_N=32 if k_cache.element_size() * head_dim_pad >= 512 else 64,
        BLOCK_SIZE=block_size, HEAD_DIM=D, HEAD_DIM_PAD=head_dim_pad, NUM_SPLITS=splits,
        # fp32 dots in full precision (not TF32) so fp32 matches the reference; ignored for 16-bit.
        DOT_DTYPE=dot_dtype, DOT_PRECISION="ieee" if dot_dtype == tl.float32 else "tf32",
        num_warps=4)
    if splits > 1:
        out.copy_(_combine_splits(part_acc, part_max, part_sum))
    return out


def _combine_splits(acc: torch.Tensor, m: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Softmax-weighted sum of the splits' partials acc [splits, T, Hq, D] with their row maxima and
    denominators m, l [splits, T, Hq] (log2 domain). Rows no split saw a key in come out 0."""
    top = m.amax(0)
    weight = torch.exp2(m - top.masked_fill(top == float("-inf"), 0.0))  # 0 for a split that saw no key
    total = (weight * l).sum(0)
    return (weight.unsqueeze(-1) * acc).sum(0) / torch.where(total > 0, total, 1.0).unsqueeze(-1)
