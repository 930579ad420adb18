"""The kernels' operator schemas, each in two namespaces: splitfuse::* (implemented in ops.py) and
splitfuse_cpu::* (the C++ kernels cpu.py loads), with the shapes torch.compile traces them by."""
import torch

SCHEMAS = {
    "store_kv": "(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()",
    "paged_attention": "(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
                       "Tensor query_start_loc, float scale, int sliding_window) -> Tensor",
    "packed_linear": "(Tensor x, Tensor packed, Tensor? bias, int out_features, bool gated=False) -> Tensor",
    "brgemm_linear": "(Tensor x, Tensor packed, Tensor? bias, int out_features, bool gated=False, "
                     "bool fp32_out=False) -> Tensor",
    "invariant_linear": "(Tensor x, Tensor weight, Tensor? bias, bool fp32_out=False) -> Tensor",
}
# Declared with torch.library's schema API rather than the custom_op decorator: its wrappers cost more
# per call than a small step's kernel (about 50 us against 15 us for the store, measured here).
LIBRARIES = {ns: torch.library.Library(ns, "DEF") for ns in ("splitfuse", "splitfuse_cpu")}
for _name, _schema in SCHEMAS.items():
    for _lib in LIBRARIES.values():
        _lib.define(_name + _schema)


def _fake_store_kv(key, value, k_cache, v_cache, slot_mapping):
    return None


def _fake_paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, sliding_window):
    return torch.empty_like(q)


def _fake_packed_linear(x, packed, bias, out_features, gated=False):
    return x.new_empty(x.shape[0], out_features, dtype=torch.float32)


def _fake_brgemm_linear(x, packed, bias, out_features, gated=False, fp32_out=False):
    return x.new_empty(x.shape[0], out_features, dtype=torch.float32 if fp32_out else x.dtype)


def _fake_invariant_linear(x, weight, bias, fp32_out=False):
    return x.new_empty(*x.shape[:-1], weight.shape[0], dtype=torch.float32 if fp32_out else x.dtype)


for _ns in LIBRARIES:
    for _name, _fake in (("store_kv", _fake_store_kv), ("paged_attention", _fake_paged_attention),
                         ("packed_linear", _fake_packed_linear), ("brgemm_linear", _fake_brgemm_linear),
                         ("invariant_linear", _fake_invariant_linear)):
        torch.library.register_fake(f"{_ns}::{_name}", _fake)
