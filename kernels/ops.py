"""The kernels as torch.library custom ops: opaque to torch.compile, one signature per op,
dispatched to Triton on CUDA, to the C++ kernels on CPU, and to the torch reference where neither fits."""
import torch

from splitfuse.kernels import cpu, reference


@torch.library.custom_op("splitfuse::store_kv", mutates_args=("k_cache", "v_cache"))
def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write new keys/values [T, Hkv, D] into the blocked caches at slot_mapping (-1 = skip)."""
    if key.is_cuda:
        from splitfuse.kernels.kv_store import store_kv_triton
        store_kv_triton(key, value, k_cache, v_cache, slot_mapping)
    elif cpu.supports(key, value, k_cache, v_cache):
        cpu.store_kv(key, value, k_cache, v_cache, slot_mapping)
    else:
        reference.store_kv(key, value, k_cache, v_cache, slot_mapping)


@torch.library.custom_op("splitfuse::paged_attention", mutates_args=())
def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
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


@paged_attention.register_fake
def _(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, sliding_window):
    return torch.empty_like(q)
