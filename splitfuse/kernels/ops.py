"""The kernels as torch.library operators (schemas.py declares them), opaque to torch.compile:
splitfuse::* dispatches to Triton on CUDA and to the torch reference elsewhere; splitfuse_cpu::* are the
C++ CPU kernels (kernels/cpu.py builds and loads them). The functions at the end pick one per call."""
import torch
from torch.nn import functional as F

from splitfuse.kernels import cpu, reference
from splitfuse.kernels.schemas import LIBRARIES

# Set by a deterministic engine (EngineConfig.deterministic), before its model is compiled: on GPU, attention
# then walks a row's keys in one program (no split-KV, whose split count follows the batch's shape) and
# linear layers take the batch-invariant matmul (kernels/matmul.py) instead of cuBLAS. The CPU kernels are
# batch-invariant whatever it says.
batch_invariant = False


def _store_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, layer: int,
              slot_mapping: torch.Tensor) -> None:
    """Write new keys/values [T, Hkv, D] into a layer's blocked caches at slot_mapping (-1 = skip)."""
    k_cache, v_cache = kv_cache[layer]
    if key.is_cuda:
        from splitfuse.kernels.kv_store import store_kv_triton
        store_kv_triton(key, value, k_cache, v_cache, slot_mapping)
    else:
        reference.store_kv(key, value, k_cache, v_cache, slot_mapping)


def _paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, layer: int, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
                     sliding_window: int) -> torch.Tensor:
    """Ragged attention of q [T, Hq, D] over a layer's blocked cache; see kernels/reference.py."""
    k_cache, v_cache = kv_cache[layer]
    if q.is_cuda:
        from splitfuse.kernels.attention import paged_attention_triton
        return paged_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                                      scale, sliding_window, split_kv=not batch_invariant)
    return reference.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                                     scale, sliding_window)


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int,
                   gated: bool = False, used: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 x [M, K] times a weight packed by reference.pack_linear_weight (CPU only): fp32 [M, out_features].
    Gated: the silu-gated product over two packs interleaved (reference.packed_gated_linear). With `used`
    ([1]), the rows from that one on are padding, and their outputs zeros."""
    if gated:
        out = reference.packed_gated_linear(x, packed, bias, out_features)
    else:
        out = reference.packed_linear(x, packed, bias, out_features)
    return reference.zero_padding(out, used)


def _brgemm_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int,
                   gated: bool = False, fp32_out: bool = False, used: torch.Tensor | None = None) -> torch.Tensor:
    """bf16 x [M, K] times a weight packed by reference.pack_brgemm_weight (CPU only), fp32 accumulation;
    `used` as for _packed_linear."""
    return reference.zero_padding(reference.brgemm_linear(x, packed, bias, out_features, gated, fp32_out), used)


def _invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      fp32_out: bool = False) -> torch.Tensor:
    """x @ weight^T + bias with a row's bits independent of the row count: kernels/matmul.py on CUDA; on CPU
    the library's linear (the CPU layers take the packed kernels, which are invariant)."""
    if x.is_cuda:
        from splitfuse.kernels.matmul import linear_triton
        return linear_triton(x, weight, bias, fp32_out)
    out = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return out if fp32_out else out.to(x.dtype)


def _argmax_rows(rows: torch.Tensor) -> torch.Tensor:
    """Each row's first maximum (a NaN counting as the maximum); max's indices are 3x argmax's speed on CPU
    (5 ms against 17 ms at 256 rows of 49152)."""
    return rows.max(dim=-1).indices


for _name, _fn in (("store_kv", _store_kv), ("paged_attention", _paged_attention), ("packed_linear", _packed_linear),
                   ("brgemm_linear", _brgemm_linear), ("invariant_linear", _invariant_linear),
                   ("argmax_rows", _argmax_rows)):
    LIBRARIES["splitfuse"].impl(_name, _fn, "CPU")
    LIBRARIES["splitfuse"].impl(_name, _fn, "CUDA")


def store_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, layer: int,
             slot_mapping: torch.Tensor) -> None:
    ops = torch.ops.splitfuse_cpu if cpu.supports(key, value, kv_cache) else torch.ops.splitfuse
    ops.store_kv(key, value, kv_cache, layer, slot_mapping)


def paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, layer: int, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
                    sliding_window: int) -> torch.Tensor:
    ops = torch.ops.splitfuse_cpu if cpu.supports(q, kv_cache) else torch.ops.splitfuse
    return ops.paged_attention(q, kv_cache, layer, block_tables, seq_lens, query_start_loc, scale, sliding_window)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int,
                  gated: bool = False, used: torch.Tensor | None = None) -> torch.Tensor:
    ops = torch.ops.splitfuse_cpu if cpu.library() is not None else torch.ops.splitfuse
    return ops.packed_linear(x, packed, bias, out_features, gated, used)


def brgemm_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int,
                  gated: bool = False, fp32_out: bool = False, used: torch.Tensor | None = None) -> torch.Tensor:
    ops = torch.ops.splitfuse_cpu if cpu.library() is not None else torch.ops.splitfuse
    return ops.brgemm_linear(x, packed, bias, out_features, gated, fp32_out, used)


def invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     fp32_out: bool = False) -> torch.Tensor:
    return torch.ops.splitfuse.invariant_linear(x, weight, bias, fp32_out)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x + residual [T, D] and its RMSNorm: the C++ kernel on CPU, one pass a row where Inductor's code made
    three over the step (1.01x offline in-process, Xeon with AMX, bf16); elsewhere the reference, which a
    compiled step fuses."""
    if cpu.supports(x, residual, weight):
        return torch.ops.splitfuse_cpu.add_rms_norm(x, residual, weight, eps)
    return reference.add_rms_norm(x, residual, weight, eps)


def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k turned by their positions (reference.rotary): the C++ kernel on CPU, one pass where Inductor's code
    made three; elsewhere the reference, which a compiled step fuses."""
    if cpu.supports(q, k) and positions.dtype == torch.int32 and cos.dtype == sin.dtype == torch.float32:
        return torch.ops.splitfuse_cpu.rotary(q, k, positions, cos, sin)
    return reference.rotary(q, k, positions, cos, sin)


def argmax_rows(rows: torch.Tensor) -> torch.Tensor:
    """Each row of rows [M, N] (fp32) its first maximum's index, as torch's max(dim=-1).indices gives it."""
    cpu_kernel = rows.device.type == "cpu" and rows.dtype == torch.float32 and rows.dim() == 2 and rows.shape[1] > 0
    ops = torch.ops.splitfuse_cpu if cpu_kernel and cpu.library() is not None else torch.ops.splitfuse
    return ops.argmax_rows(rows)
