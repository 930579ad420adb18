"""Triton kernel writing new keys/values into the blocked KV cache (semantics: reference.store_kv)."""
import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(key, value, k_cache, v_cache, slot_mapping,
                     stride_kt, stride_kh, stride_kd,
                     stride_vt, stride_vh, stride_vd,
                     stride_cb, stride_cs, stride_ch, stride_cd,
                     block_size, num_heads, head_dim,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per token, so the grid depends only on T (CUDA-graph friendly).
    t = tl.program_id(0)
    slot = tl.load(slot_mapping + t).to(tl.int64)  # int64: cache offsets can exceed 2**31
    if slot < 0:  # padded token
        return
    block = slot // block_size
    offset = slot % block_size
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < num_heads) & (d < head_dim)
    dst = block * stride_cb + offset * stride_cs + h * stride_ch + d * stride_cd
    k = tl.load(key + t * stride_kt + h * stride_kh + d * stride_kd, mask=mask)
    tl.store(k_cache + dst, k.to(k_cache.dtype.element_ty), mask=mask)
    v = tl.load(value + t * stride_vt + h * stride_vh + d * stride_vd, mask=mask)
    tl.store(v_cache + dst, v.to(v_cache.dtype.element_ty), mask=mask)


def store_kv_triton(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """Write key/value [T, Hkv, D] into k_cache/v_cache [num_blocks, block_size, Hkv, D] at flat
    slots (block * block_size + offset); slot -1 marks a padded token and is skipped."""
    if key.shape != value.shape or key.dim() != 3:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must both be [T, Hkv, D]")
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride() or k_cache.dim() != 4:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must be "
                         "[num_blocks, block_size, Hkv, D] with the same layout")
    if k_cache.shape[2:] != key.shape[1:]:
        raise ValueError(f"cache heads/head_dim {tuple(k_cache.shape[2:])} != key's {tuple(key.shape[1:])}")
    if slot_mapping.shape != (key.shape[0],):
        raise ValueError(f"slot_mapping {tuple(slot_mapping.shape)} must be [T={key.shape[0]}]")
    T, H, D = key.shape
    if T == 0:
        return
    _store_kv_kernel[(T,)](
        key, value, k_cache, v_cache, slot_mapping,
        *key.stride(), *value.stride(), *k_cache.stride(),
        k_cache.shape[1], H, D,
        BLOCK_H=triton.next_power_of_2(H), BLOCK_D=triton.next_power_of_2(D))
