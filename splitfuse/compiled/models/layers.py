"""Pieces shared by the model families: norms, rotary embeddings, blocked-KV attention."""
import math

import torch
from torch import nn
from torch.nn import functional as F

from splitfuse.compiled.batch import Batch
from splitfuse.kernels import cpu, ops
from splitfuse.kernels.reference import (BRGEMM_CHUNK, PANEL, VNNI, interleave_panels, pack_brgemm_weight,
                                        pack_linear_weight, rms_norm)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x + residual (the residual stream's next value) and its norm."""
        return ops.add_rms_norm(x, residual, self.weight, self.eps)


class Linear(nn.Linear):
    """nn.Linear that on CPU keeps its weight packed for one of the C++ kernels and uses it for every step.
    fp32 activations: the packed kernel (kernels/reference.py, pack_linear_weight), which outran the GEMM
    library, even prepacked, at every row count measured (1 to 256; 1.25x at 256, 3x at 16), since the
    weights come from memory each step and the library streams them poorly at these sizes. bf16 where the
    CPU has bf16 dot products or AMX tiles: the brgemm kernel (pack_brgemm_weight), which oneDNN's
    micro-kernels run; other weights pack for the packed kernel (bf16 and fp16 exactly). Both give a row
    the same bits whatever the row count, which the library's GEMM does not (tests/test_batch_invariance.py).
    A packed weight is an ordinary tensor, so a compiled graph takes it as an input and nothing is frozen
    into the graph (Inductor's cache can then key on the graph alone)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.register_buffer("packed", None, persistent=False)

    def pack_for_cpu(self) -> None:
        if self.weight.device.type != "cpu":
            return
        if self.weight.dtype == torch.bfloat16 and self.in_features % VNNI == 0 and cpu.has_bf16_gemm():
            self.packed = pack_brgemm_weight(self.weight)
        else:
            self.packed = pack_linear_weight(self.weight)

    def forward(self, x: torch.Tensor, used: torch.Tensor | None = None) -> torch.Tensor:
        return self.project(x, self.bias, used)

    def project(self, x: torch.Tensor, bias: torch.Tensor | None, used: torch.Tensor | None = None) -> torch.Tensor:
        """x @ weight.T + bias; a row-parallel shard adds its bias only after summing the ranks' products.
        With `used` (Batch.used), the CPU kernels multiply only the rows in use: padding costs no products."""
        if self.packed is not None:
            return packed_product(x, self.packed, bias, self.out_features, used=used)
        if ops.batch_invariant:
            return ops.invariant_linear(x, self.weight, bias)
        return F.linear(x, self.weight, bias)


def packed_product(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int,
                   gated: bool = False, fp32_out: bool = False, used: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel a packed weight is for, told apart by its last dimension: brgemm packs [chunks, K / 2, 64, 2], or
    panels [N / 16, K, 16] (computed in fp32). Results in x's dtype, or fp32 with fp32_out."""
    if packed.shape[-1] == VNNI:
        return ops.brgemm_linear(x, packed, bias, out_features, gated, fp32_out, used)
    out = ops.packed_linear(x.float(), packed, bias, out_features, gated, used)
    return out if fp32_out else out.to(x.dtype)


def _take_packs(members: tuple[Linear, ...], side_by_side: bool) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The members' packed weights for one call of a CPU kernel, and their biases, each concatenated; the
    members give up their own. None where they cannot go together: not all packed, in two layouts, biases
    on some only, or (side by side) an output count short of whole panels or chunks before the last member
    (its padding would sit between two outputs). brgemm packs concatenate as they are (gate then up);
    panels of gate and up interleave panel by panel (one shape)."""
    packs, biases = [m.packed for m in members], [m.bias for m in members]
    if (any(p is None for p in packs) or len({(p.dtype, p.shape[-1]) for p in packs}) > 1
            or len({b is None for b in biases}) > 1):
        return None
    brgemm = packs[0].shape[-1] == VNNI
    if side_by_side and any(m.out_features % (BRGEMM_CHUNK if brgemm else PANEL) for m in members[:-1]):
        return None
    for m in members:
        m.packed = None
    packed = torch.cat(packs) if brgemm or side_by_side else interleave_panels(*packs)
    return packed, None if biases[0] is None else torch.cat(biases)


class Projections(nn.Module):
    """Projections of one input (q, k, v) computed by one call of the CPU kernel over their packed weights
    side by side: seven calls a layer were a sixth of a one-token step when each cost 20 us of dispatch.
    Elsewhere, or where the packs cannot go together, each member projects on its own."""

    def __init__(self, *members: Linear):
        super().__init__()
        self.members = members  # a tuple: the parent module registers them under their own names
        self.sizes = [m.out_features for m in members]
        self.register_buffer("packed", None, persistent=False)
        self.register_buffer("bias", None, persistent=False)

    def pack_for_cpu(self) -> None:
        """After the members have packed their weights."""
        self.packed, self.bias = _take_packs(self.members, side_by_side=True) or (None, None)

    def forward(self, x: torch.Tensor, used: torch.Tensor | None = None) -> list[torch.Tensor]:
        if self.packed is None:
            return [m(x, used) for m in self.members]
        return list(packed_product(x, self.packed, self.bias, sum(self.sizes), used=used).split(self.sizes, dim=1))


class GatedProjection(Projections):
    """silu(gate(x)) * up(x): on CPU one call of the gated kernel, which never writes either product out
    (gate and up side by side took 3% longer at 256 rows than two calls, with silu * mul after them)."""

    def __init__(self, gate: Linear, up: Linear):
        super().__init__(gate, up)

    def pack_for_cpu(self) -> None:
        self.packed, self.bias = _take_packs(self.members, side_by_side=False) or (None, None)

    def forward(self, x: torch.Tensor, used: torch.Tensor | None = None) -> torch.Tensor:
        if self.packed is None:
            gate, up = self.members
            return F.silu(gate(x, used)) * up(x, used)
        return packed_product(x, self.packed, self.bias, self.sizes[0], gated=True, used=used)


class LMHead(Linear):
    """The projection to the vocabulary, accumulated and returned in fp32 whatever the model dtype:
    bf16-rounded logits (spacing 0.125 near 25) flip greedy near-ties. On CPU a packed kernel does that
    for any number of rows: the brgemm kernel for bf16 where the CPU has it, else the packed kernel (a bf16
    weight packs exactly). It runs outside the compiled graph, on the sampled rows only."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return packed_product(x, self.packed, None, self.out_features, fp32_out=True)
        if ops.batch_invariant:
            return ops.invariant_linear(x, self.weight, None, fp32_out=True)
        if self.weight.dtype == torch.float32:
            return F.linear(x, self.weight)
        return torch.mm(x, self.weight.t(), out_dtype=torch.float32)


def rope_parameters(config) -> dict:
    """Rotary settings from either config style (transformers >= 5 `rope_parameters`, or
    `rope_theta` plus `rope_scaling`)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def rope_inv_freq(config, head_dim: int) -> torch.Tensor:
    params = rope_parameters(config)
    inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim))
    kind = params["rope_type"]
    if kind == "default":
        return inv_freq.float()
    if kind == "linear":
        return (inv_freq / params["factor"]).float()
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, params).float()
    raise ValueError(f"unsupported rope type {kind!r}; supported: default, linear, llama3")


def _llama3_inv_freq(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between."""
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_mid, mid, scaled)


class Rotary(nn.Module):
    """cos/sin tables for every position up to the model's maximum, indexed per token."""

    def __init__(self, config, head_dim: int, max_positions: int):
        super().__init__()
        # Built on the CPU explicitly: models are constructed on the meta device, and these are not loaded.
        positions = torch.arange(max_positions, dtype=torch.float32, device="cpu")
        freqs = torch.outer(positions, rope_inv_freq(config, head_dim))
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        return ops.rotary(q, k, positions, self.cos, self.sin)


def blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: tuple[torch.Tensor, int],
                      batch: Batch, scale: float, sliding_window: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Store the new keys/values, then attend over each sequence's cached context. q/k/v: [T, H, D];
    kv_cache: the whole cache and this layer's index in it.
    With `rows`, attend for the tokens at those rows only, each as a sequence of one query over its context;
    rows of -1 (padding, after the others) attend to nothing."""
    cache, layer = kv_cache
    ops.store_kv(k, v, cache, layer, batch.slot_mapping)  # k and v may be column slices of a projection
    tables, lens, starts = batch.block_tables, batch.seq_lens, batch.query_start_loc
    if rows is not None:
        real = rows >= 0
        q = q[rows]
        # A row's sequence: the last that starts at or before it.
        tables = tables[(torch.searchsorted(starts, rows, right=True) - 1).clamp(0, tables.shape[0] - 1)]
        lens = torch.where(real, batch.positions[rows] + 1, 0)
        starts = torch.cat([starts[:1], real.cumsum(0).to(starts.dtype)])  # starts[0] is 0
    out = ops.paged_attention(q, cache, layer, tables, lens, starts, scale, sliding_window)
    return out.flatten(1)
