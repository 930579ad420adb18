"""Llama 1/2/3, Mistral and Qwen2: one decoder, differing only in settings read from the config
(Mistral's sliding window, Qwen2's q/k/v bias). Parameter names follow Hugging Face's."""
import torch
from torch import nn
from torch.nn import functional as F

from splitfuse.compiled.batch import Batch
from splitfuse.compiled.models.layers import Linear, LMHead, RMSNorm, Rotary, blocked_attention


def _sliding_window(config) -> int:
    if config.model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
        return 0
    return getattr(config, "sliding_window", None) or 0


class Attention(nn.Module):
    def __init__(self, config, head_dim: int):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim
        qkv_bias = config.model_type == "qwen2" or getattr(config, "attention_bias", False)
        o_bias = config.model_type != "qwen2" and getattr(config, "attention_bias", False)
        h = config.hidden_size
        self.q_proj = Linear(h, self.num_heads * head_dim, bias=qkv_bias)
        self.k_proj = Linear(h, self.num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = Linear(h, self.num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = Linear(self.num_heads * head_dim, h, bias=o_bias)
        self.scale = head_dim ** -0.5
        self.sliding_window = _sliding_window(config)

    def forward(self, x, batch: Batch, rotary: Rotary, kv_cache):
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        q, k = rotary(batch.positions, q, k)
        return self.o_proj(blocked_attention(q, k, v, kv_cache, batch, self.scale, self.sliding_window))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.hidden_act not in ("silu", "swish"):
            raise ValueError(f"unsupported activation {config.hidden_act!r}; supported: silu")
        bias = getattr(config, "mlp_bias", False)
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = Linear(h, i, bias=bias)
        self.up_proj = Linear(h, i, bias=bias)
        self.down_proj = Linear(i, h, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config, head_dim: int):
        super().__init__()
        self.self_attn = Attention(config, head_dim)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, batch, rotary, kv_cache):
        x = x + self.self_attn(self.input_layernorm(x), batch, rotary, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config, head_dim: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, head_dim) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Forward over a flat ragged batch; returns the final hidden states of batch.logits_indices, which
    lm_head turns into fp32 logits (the runner applies it outside the compiled graph, to the real rows)."""

    def __init__(self, config):
        super().__init__()
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.num_layers = config.num_hidden_layers
        self.max_model_len = config.max_position_embeddings
        self.sliding_window = _sliding_window(config)
        self.model = LlamaModel(config, self.head_dim)
        self.rotary = Rotary(config, self.head_dim, self.max_model_len)
        self.lm_head = LMHead(config.hidden_size, config.vocab_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, batch: Batch, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        x = self.model.embed_tokens(batch.input_ids)
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            x = layer(x, batch, self.rotary, kv_cache)
        return self.model.norm(x[batch.logits_indices])
