"""The kernels, one signature each, dispatched to Triton on CUDA, to the C++ kernels on CPU, and to the
torch reference where neither fits. While torch.compile traces they go through torch.library custom ops,
opaque to it; run eagerly they are called directly, since a custom op's dispatch costs more than a small
step's kernel (about 100 us for the mutating store, against 15 us for the store itself)."""
import torch

from splitfuse.kernels import cpu, reference


def _store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              slot_mapping: torch.Tensor) -> None:
    """Write new keys/values [T, Hkv, D] into the blocked caches at slot_mapping (-1 = skip)."""
    if key.is_cuda:
        from splitfuse.kernels.kv_store import store_kv_triton
        store_kv_triton(key, value, k_cache, v_cache, slot_mapping)
    elif cpu.supports(key, value, k_cache, v_cache):
        cpu.store_kv(key, value, k_cache, v_cache, slot_mapping)
    else:
        reference.store_kv(key, value, k_cache, v_cache, slot_mapping)


def _paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                     scale: float, sliding_window: int) -> torch.Tensor:
    """Ragged attention of q [T, Hq, D] over the blocked cache; see kernels/reference.py."""
    if q.is_cuda:
        from splitfuse.kernels.attention import paged_attention_triton
        return paged_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                                      scale, sliding_window)
    if cpu.supports(q, k_cache, v_cache):
        return cpu.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, sliding_window)
    return reference.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                                     scale, sliding_window)


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                   out_features: int) -> torch.Tensor:
    """fp32 x [M, K] times a weight packed by reference.pack_linear_weight (CPU only): fp32 [M, out_features]."""
    x = x.contiguous()
    if cpu.library() is not None:
        return cpu.packed_linear(x, packed, bias, out_features)
    return reference.packed_linear(x, packed, bias, out_features)


_store_kv_op = torch.library.custom_op("splitfuse::store_kv", _store_kv, mutates_args=("k_cache", "v_cache"))
_paged_attention_op = torch.library.custom_op("splitfuse::paged_attention", _paged_attention, mutates_args=())
_packed_linear_op = torch.library.custom_op("splitfuse::packed_linear", _packed_linear, mutates_args=())


@_paged_attention_op.register_fake
def _(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, sliding_window):
    return torch.empty_like(q)


@_packed_linear_op.register_fake
def _(x, packed, bias, out_features):
    return x.new_empty(x.shape[0], out_features, dtype=torch.float32)


def store_kv(*args) -> None:
    (_store_kv_op if torch.compiler.is_compiling() else _store_kv)(*args)


def paged_attention(*args) -> torch.Tensor:
    return (_paged_attention_op if torch.compiler.is_compiling() else _paged_attention)(*args)


def packed_linear(*args) -> torch.Tensor:
    return (_packed_linear_op if torch.compiler.is_compiling() else _packed_linear)(*args)
