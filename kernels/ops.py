"""The kernels as torch.library operators, opaque to torch.compile, one signature each, dispatched to
Triton on CUDA, to the C++ kernels on CPU, and to the torch reference where neither fits."""
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


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int,
                   gated: bool = False) -> torch.Tensor:
    """fp32 x [M, K] times a weight packed by reference.pack_linear_weight (CPU only): fp32 [M, out_features].
    Gated: the silu-gated product over two packs interleaved (reference.packed_gated_linear)."""
    x = x.contiguous()
    if cpu.library() is not None:
        return cpu.packed_linear(x, packed, bias, out_features, gated)
    if gated:
        return reference.packed_gated_linear(x, packed, bias, out_features)
    return reference.packed_linear(x, packed, bias, out_features)


# Declared with torch.library's schema API rather than the custom_op decorator: its wrappers cost more
# per call than a small step's kernel (about 50 us against 15 us for the store, measured here).
_lib = torch.library.Library("splitfuse", "DEF")
_lib.define("store_kv(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()")
_lib.define("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
            "Tensor query_start_loc, float scale, int sliding_window) -> Tensor")
_lib.define("packed_linear(Tensor x, Tensor packed, Tensor? bias, int out_features, bool gated=False) -> Tensor")
for _name, _fn in (("store_kv", _store_kv), ("paged_attention", _paged_attention), ("packed_linear", _packed_linear)):
    _lib.impl(_name, _fn, "CPU")
    _lib.impl(_name, _fn, "CUDA")


@torch.library.register_fake("splitfuse::store_kv")
def _(key, value, k_cache, v_cache, slot_mapping):
    return None


@torch.library.register_fake("splitfuse::paged_attention")
def _(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, sliding_window):
    return torch.empty_like(q)


@torch.library.register_fake("splitfuse::packed_linear")
def _(x, packed, bias, out_features, gated=False):
    return x.new_empty(x.shape[0], out_features, dtype=torch.float32)


store_kv = torch.ops.splitfuse.store_kv
paged_attention = torch.ops.splitfuse.paged_attention
packed_linear = torch.ops.splitfuse.packed_linear
