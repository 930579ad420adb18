"""Torch implementations of the kernels: the CPU serving path and the oracle for the Triton ones.

Shapes (one attention layer):
  q            [T, Hq, D]      new tokens of all sequences, flat; rows past query_start_loc[-1] are padding
  k_cache      [num_blocks, block_size, Hkv, D]   (v_cache the same)
  block_tables [S, max_blocks] int32, the blocks of each sequence in order
  seq_lens     [S] int32, context length of each sequence *including* its new tokens
  query_start_loc [S+1] int32, sequence s owns q[query_start_loc[s]:query_start_loc[s+1]]
A padded sequence has query length 0; a sequence's new tokens sit at the end of its context,
so new token i of sequence s is at position seq_lens[s] - q_len + i and attends causally.
sliding_window > 0 restricts each query to the last `sliding_window` positions, itself included.
The cache must hold finite values everywhere (the runner zero-initialises it): slots past a
sequence's context are read and masked here, and a mask cannot cancel NaN (0 * NaN = NaN).
"""
import torch
from torch.nn import functional as F


def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write key/value [T, Hkv, D] into the caches at flat slots; slot -1 marks a padded token."""
    rows = (slot_mapping >= 0).nonzero().squeeze(1)
    slots = slot_mapping.index_select(0, rows).long()
    # index_copy_ rather than advanced-index assignment: the latter is far slower on CPU.
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, key.index_select(0, rows).to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, value.index_select(0, rows).to(v_cache.dtype))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                    scale: float, sliding_window: int) -> torch.Tensor:
    """Attention of every new token over its sequence's cached context (see module docstring)."""
    out = torch.zeros_like(q)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    q_lens = [starts[i + 1] - starts[i] for i in range(len(lens))]
    decodes = [s for s, n in enumerate(q_lens) if n == 1]
    if decodes:
        _decode_attention(q, k_cache, v_cache, block_tables, decodes, starts, lens, scale, sliding_window, out)
    for s, n in enumerate(q_lens):
        if n > 1:
            _chunk_attention(q, k_cache, v_cache, block_tables[s], starts[s], n, lens[s], scale,
                             sliding_window, out)
    return out


def _gather(cache: torch.Tensor, block_table: torch.Tensor, ctx: int) -> torch.Tensor:
    """Context [.., ctx, Hkv, D] of sequences whose blocks are listed in block_table [.., max_blocks]."""
    block_size = cache.shape[1]
    n_blocks = -(-ctx // block_size)
    ids = block_table[..., :n_blocks]
    # index_select of whole blocks as flat rows: on CPU about 2x faster than on the 4-d view,
    # and several times faster than advanced indexing.
    rows = cache.view(cache.shape[0], -1).index_select(0, ids.flatten())
    blocks = rows.view(*ids.shape, *cache.shape[1:])  # [.., n_blocks, bs, Hkv, D]
    return blocks.flatten(-4, -3)[..., :ctx, :, :]


def _decode_attention(q, k_cache, v_cache, block_tables, seqs, starts, lens, scale, window, out) -> None:
    """All single-token queries at once, contexts padded to the longest and masked. The query heads
    sharing a KV head form the query axis, so GQA needs no copies of K/V."""
    idx = torch.tensor(seqs, device=q.device)
    rows = torch.tensor([starts[s] for s in seqs], device=q.device)
    ctx_lens = torch.tensor([lens[s] for s in seqs], device=q.device)
    max_ctx = int(ctx_lens.max())
    num_kv = k_cache.shape[2]
    k = _gather(k_cache, block_tables[idx], max_ctx).transpose(1, 2).to(q.dtype)  # [B, Hkv, C, D]
    v = _gather(v_cache, block_tables[idx], max_ctx).transpose(1, 2).to(q.dtype)
    pos = torch.arange(max_ctx, device=q.device)
    keep = pos[None, :] < ctx_lens[:, None]
    if window > 0:
        keep &= pos[None, :] >= (ctx_lens[:, None] - window)
    qs = q[rows].unflatten(1, (num_kv, -1))  # [B, Hkv, groups, D]
    o = F.scaled_dot_product_attention(qs, k, v, attn_mask=keep[:, None, None, :], scale=scale)
    out[rows] = o.flatten(1, 2).to(out.dtype)


def _chunk_attention(q, k_cache, v_cache, block_table, start, n, ctx, scale, window, out) -> None:
    """One sequence's chunk of n new tokens, causal, over its whole context."""
    k = _gather(k_cache, block_table, ctx).transpose(0, 1).to(q.dtype)  # [Hkv, C, D]
    v = _gather(v_cache, block_table, ctx).transpose(0, 1).to(q.dtype)
    qs = q[start:start + n].transpose(0, 1)  # [Hq, n, D]
    q_pos = torch.arange(ctx - n, ctx, device=q.device)[:, None]
    k_pos = torch.arange(ctx, device=q.device)[None, :]
    keep = k_pos <= q_pos
    if window > 0:
        keep &= k_pos > q_pos - window
    o = F.scaled_dot_product_attention(qs, k, v, attn_mask=keep, scale=scale, enable_gqa=k.shape[0] != qs.shape[0])
    out[start:start + n] = o.transpose(0, 1).to(out.dtype)


# Packed linear weights: [N / PANEL, K, PANEL], output features in panels of 16 (zero rows pad N), each
# panel stored input-feature-major so a kernel streams it once. bf16 when every weight is exactly a bf16
# (half the bytes to read, the same products), fp32 otherwise. A bf16 panel row holds its columns in the
# order c, 8 + c (c = 0..7): each 32-bit lane carries two, which a shift and a mask widen to fp32.
PANEL = 16
_BF16_ORDER = torch.arange(PANEL).view(2, PANEL // 2).t().flatten()  # 0, 8, 1, 9, ..., 7, 15


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as the reference implementations do it: normalised in fp32, scaled in x's dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream's next value, x + residual, and its RMSNorm."""
    total = x + residual
    return total, rms_norm(total, weight, eps)


def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D] and k [T, Hk, D] turned by their tokens' positions, x cos + rotate_half(x) sin, over the fp32
    tables cos and sin [P, D]: in fp32, rounded once to x's dtype."""
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)

    def turn(x: torch.Tensor) -> torch.Tensor:
        h, half = x.float(), x.shape[-1] // 2
        return (h * c + torch.cat([-h[..., half:], h[..., :half]], dim=-1) * s).to(x.dtype)

    return turn(q), turn(k)


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    n, k = weight.shape
    # A bf16 is the top half of an fp32: an fp32 weight is exactly a bf16 when its low halves are all 0.
    exact = weight.dtype == torch.bfloat16 or (
        weight.dtype == torch.float32 and not (weight.view(torch.int32) & 0xFFFF).any())
    padded = torch.zeros(-(-n // PANEL) * PANEL, k, dtype=torch.bfloat16 if exact else torch.float32)
    padded[:n] = weight
    panels = padded.view(-1, PANEL, k).transpose(1, 2)
    return (panels[..., _BF16_ORDER] if exact else panels).contiguous()


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """x [M, K] fp32 times the packed weight, plus bias: fp32 [M, out_features]."""
    if packed.dtype == torch.bfloat16:
        packed = packed[..., _BF16_ORDER.argsort()]
    weight = packed.transpose(1, 2).reshape(-1, packed.shape[1])[:out_features].float()
    return F.linear(x, weight, None if bias is None else bias.float())


def zero_padding(out: torch.Tensor, used: torch.Tensor | None) -> torch.Tensor:
    """out with its rows from `used` ([1], the count of rows in use) on zeroed: a linear's padding rows."""
    if used is not None:
        out[int(used[0]):] = 0
    return out


def interleave_panels(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Two packed weights of one shape, panel by panel (gate, up, gate, ...): the gated kernel's operand."""
    return torch.stack([gate, up], dim=1).flatten(0, 1)


def packed_gated_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                        out_features: int) -> torch.Tensor:
    """silu(x @ gate^T + bias[:N]) * (x @ up^T + bias[N:]), N = out_features, over interleave_panels' layout."""
    n = out_features
    gate = packed_linear(x, packed[0::2], None if bias is None else bias[:n], n)
    return F.silu(gate) * packed_linear(x, packed[1::2], None if bias is None else bias[n:], n)


# bf16 weights for ATen's batch-reduce GEMM (cpu_kernels.cpp, brgemm_linear), in chunks of BRGEMM_CHUNK outputs:
# [ceil(N / BRGEMM_CHUNK), K / 2, BRGEMM_CHUNK, 2], consecutive pairs of input features side by side (the VNNI
# layout that AMX tiles and AVX-512 BF16 dot products read), zero outputs padding the last chunk. Each chunk is
# one contiguous run, which streams from memory faster than the K / 2 strided rows of an unchunked pack. K must
# be even. Packs concatenate along dim 0 into the pack of the concatenated weights: gate then up for the gated
# kernel, or side by side (q, k, v) where all but the last fill whole chunks.
VNNI = 2
BRGEMM_CHUNK = 64


def pack_brgemm_weight(weight: torch.Tensor) -> torch.Tensor:
    n, k = weight.shape
    chunks = -(-n // BRGEMM_CHUNK)
    padded = F.pad(weight.to(torch.bfloat16), (0, 0, 0, chunks * BRGEMM_CHUNK - n))
    return padded.view(chunks, BRGEMM_CHUNK, k // VNNI, VNNI).transpose(1, 2).contiguous()


def brgemm_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int,
                  gated: bool, fp32_out: bool) -> torch.Tensor:
    """x [M, K] bf16 times the packed weight (gated: gate's then up's), plus bias, accumulated in fp32: fp32
    [M, out_features] with fp32_out, else bf16."""
    chunks, half_k = packed.shape[:2]
    weight = packed.transpose(1, 2).reshape(chunks * BRGEMM_CHUNK, half_k * VNNI).float()
    up = chunks // 2 * BRGEMM_CHUNK  # where up's outputs start in a gated pack
    weight = torch.cat([weight[:out_features], weight[up:up + out_features]]) if gated else weight[:out_features]
    out = F.linear(x.float(), weight, None if bias is None else bias.float())
    if gated:
        out = F.silu(out[:, :out_features]) * out[:, out_features:]
    return out if fp32_out else out.to(torch.bfloat16)
