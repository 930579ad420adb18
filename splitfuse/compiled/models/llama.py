"""Llama 1/2/3, Mistral and Qwen2: one decoder, differing only in settings read from the config
(Mistral's sliding window, Qwen2's q/k/v bias). Parameter names follow Hugging Face's."""
import torch
from torch import nn

from splitfuse.compiled.batch import Batch
from splitfuse.compiled.models.layers import GatedProjection, Projections, RMSNorm, Rotary, blocked_attention
from splitfuse.compiled.models.sharded import ColumnLinear, RowLinear, VocabEmbedding, VocabLMHead, attention_heads
from splitfuse.compiled.parallel import SINGLE, Shard


def _sliding_window(config) -> int:
    if config.model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
        return 0
    return getattr(config, "sliding_window", None) or 0


class Attention(nn.Module):
    def __init__(self, config, head_dim: int, shard: Shard):
        super().__init__()
        heads = attention_heads(config.num_attention_heads, config.num_key_value_heads, shard)
        self.num_heads, self.num_kv_heads = heads.q_count, heads.kv_count  # this rank's
        self.head_dim = head_dim
        qkv_bias = config.model_type == "qwen2" or getattr(config, "attention_bias", False)
        o_bias = config.model_type != "qwen2" and getattr(config, "attention_bias", False)
        h, q, kv = config.hidden_size, heads.q_start * head_dim, heads.kv_start * head_dim
        self.q_proj = ColumnLinear(h, self.num_heads * head_dim, qkv_bias, q)
        self.k_proj = ColumnLinear(h, self.num_kv_heads * head_dim, qkv_bias, kv)
        self.v_proj = ColumnLinear(h, self.num_kv_heads * head_dim, qkv_bias, kv)
        self.o_proj = RowLinear(self.num_heads * head_dim, h, o_bias, q, shard)
        self.qkv = Projections(self.q_proj, self.k_proj, self.v_proj)
        self.scale = head_dim ** -0.5
        self.sliding_window = _sliding_window(config)

    def forward(self, x, batch: Batch, rotary: Rotary, kv_cache, rows=None):
        t, used = x.shape[0], batch.used()
        q, k, v = self.qkv(x, used)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        q, k = rotary(batch.positions, q, k)
        out = blocked_attention(q, k, v, kv_cache, batch, self.scale, self.sliding_window, rows)
        return self.o_proj(out, used if rows is None else None)


class MLP(nn.Module):
    def __init__(self, config, shard: Shard):
        super().__init__()
        if config.hidden_act not in ("silu", "swish"):
            raise ValueError(f"unsupported activation {config.hidden_act!r}; supported: silu")
        bias = getattr(config, "mlp_bias", False)
        h, (start, i) = config.hidden_size, shard.split(config.intermediate_size)
        self.gate_proj = ColumnLinear(h, i, bias, start)
        self.up_proj = ColumnLinear(h, i, bias, start)
        self.down_proj = RowLinear(i, h, bias, start, shard)
        self.gate_up = GatedProjection(self.gate_proj, self.up_proj)

    def forward(self, x, used=None):
        return self.down_proj(self.gate_up(x, used), used)


class DecoderLayer(nn.Module):
    def __init__(self, config, head_dim: int, shard: Shard):
        super().__init__()
        self.self_attn = Attention(config, head_dim, shard)
        self.mlp = MLP(config, shard)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, residual, batch, rotary, kv_cache, rows=None):
        """The layer's output and the residual stream before it is added: x + residual is the stream after the
        layer before (residual None: x is). With `rows`, those rows only (every row's keys and values are stored)."""
        residual, h = (x, self.input_layernorm(x)) if residual is None else self.input_layernorm.add(x, residual)
        h = self.self_attn(h, batch, rotary, kv_cache, rows)
        residual, h = self.post_attention_layernorm.add(h, residual if rows is None else residual[rows])
        return self.mlp(h, batch.used() if rows is None else None), residual


class LlamaModel(nn.Module):
    def __init__(self, config, head_dim: int, shard: Shard):
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size, shard)
        self.layers = nn.ModuleList(DecoderLayer(config, head_dim, shard) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Forward over a flat ragged batch; returns the final hidden states of batch.logits_indices, which
    lm_head turns into fp32 logits (the runner applies it outside the compiled graph, to the real rows).
    With a shard of a tensor-parallel group, this rank's part of it (compiled/parallel.py)."""

    def __init__(self, config, shard: Shard = SINGLE):
        super().__init__()
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_kv_heads = attention_heads(config.num_attention_heads, config.num_key_value_heads, shard).kv_count
        self.num_layers = config.num_hidden_layers
        self.max_model_len = config.max_position_embeddings
        self.sliding_window = _sliding_window(config)
        self.model = LlamaModel(config, self.head_dim, shard)
        self.rotary = Rotary(config, self.head_dim, self.max_model_len)
        self.lm_head = VocabLMHead(config.hidden_size, config.vocab_size, shard)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, batch: Batch, kv_cache: torch.Tensor) -> torch.Tensor:
        x, residual = self.model.embed_tokens(batch.input_ids), None
        *layers, last = self.model.layers
        for i, layer in enumerate(layers):
            x, residual = layer(x, residual, batch, self.rotary, (kv_cache, i))
        # The last layer's output is read at the logits rows only: the other rows need just its keys and
        # values (a 256-token prompt step spends about a thirtieth of its time there).
        x, residual = last(x, residual, batch, self.rotary, (kv_cache, len(layers)), batch.logits_indices)
        return self.model.norm.add(x, residual)[1]
