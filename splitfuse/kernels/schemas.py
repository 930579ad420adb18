"""The kernels' operator schemas, each in two namespaces: splitfuse::* (implemented in ops.py) and
splitfuse_cpu::* (the C++ kernels cpu.py loads), with the shapes torch.compile traces them by.

The attention operators take the whole KV cache, [layers, 2 (keys, values), blocks, block_size, Hkv, D], and
a layer: a compiled step then has one cache input, whose block count (which follows memory) is one symbol.
Sixty per-layer caches were sixty symbols, checked and passed on in every step: about 0.6 ms of host time
in a 1-token step of the bundled model (the torch profiler, AVX-512 BF16 Zen 4)."""
import torch

SCHEMAS = {
    "store_kv": "(Tensor key, Tensor value, Tensor(a!) kv_cache, int layer, Tensor slot_mapping) -> ()",
    "paged_attention": "(Tensor q, Tensor kv_cache, int layer, Tensor block_tables, Tensor seq_lens, "
                       "Tensor query_start_loc, float scale, int sliding_window) -> Tensor",
    "packed_linear": "(Tensor x, Tensor packed, Tensor? bias, int out_features, bool gated=False, "
                     "Tensor? used=None) -> Tensor",
    "brgemm_linear": "(Tensor x, Tensor packed, Tensor? bias, int out_features, bool gated=False, "
                     "bool fp32_out=False, Tensor? used=None) -> Tensor",
    "invariant_linear": "(Tensor x, Tensor weight, Tensor? bias, bool fp32_out=False) -> Tensor",
    "argmax_rows": "(Tensor rows) -> Tensor",
}
# The C++ kernels' own operators, without a splitfuse::* twin: elsewhere the model runs the reference's torch code,
# which a compiled step fuses.
CPU_SCHEMAS = {
    "add_rms_norm": "(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)",
    "rotary": "(Tensor q, Tensor k, Tensor positions, Tensor cos, Tensor sin) -> (Tensor, Tensor)",
}
# Declared with torch.library's schema API rather than the custom_op decorator: its wrappers cost more
# per call than a small step's kernel (about 50 us against 15 us for the store, measured here).
LIBRARIES = {ns: torch.library.Library(ns, "DEF") for ns in ("splitfuse", "splitfuse_cpu")}
for _name, _schema in SCHEMAS.items():
    for _lib in LIBRARIES.values():
        _lib.define(_name + _schema)
for _name, _schema in CPU_SCHEMAS.items():
    LIBRARIES["splitfuse_cpu"].define(_name + _schema)


def _fake_store_kv(key, value, kv_cache, layer, slot_mapping):
    return None


def _fake_paged_attention(q, kv_cache, layer, block_tables, seq_lens, query_start_loc, scale, sliding_window):
    return torch.empty_like(q)


def _fake_packed_linear(x, packed, bias, out_features, gated=False, used=None):
    return x.new_empty(x.shape[0], out_features, dtype=torch.float32)


def _fake_brgemm_linear(x, packed, bias, out_features, gated=False, fp32_out=False, used=None):
    return x.new_empty(x.shape[0], out_features, dtype=torch.float32 if fp32_out else x.dtype)


def _fake_invariant_linear(x, weight, bias, fp32_out=False):
    return x.new_empty(*x.shape[:-1], weight.shape[0], dtype=torch.float32 if fp32_out else x.dtype)


def _fake_argmax_rows(rows):
    return rows.new_empty(rows.shape[:-1], dtype=torch.long)


def _fake_add_rms_norm(x, residual, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


def _fake_rotary(q, k, positions, cos, sin):
    return q.new_empty(q.shape), k.new_empty(k.shape)


for _ns in LIBRARIES:
    for _name, _fake in (("store_kv", _fake_store_kv), ("paged_attention", _fake_paged_attention),
                         ("packed_linear", _fake_packed_linear), ("brgemm_linear", _fake_brgemm_linear),
                         ("invariant_linear", _fake_invariant_linear), ("argmax_rows", _fake_argmax_rows)):
        torch.library.register_fake(f"{_ns}::{_name}", _fake)
torch.library.register_fake("splitfuse_cpu::add_rms_norm", _fake_add_rms_norm)
torch.library.register_fake("splitfuse_cpu::rotary", _fake_rotary)
