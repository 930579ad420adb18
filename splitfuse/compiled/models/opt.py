"""OPT: learned positions (offset by 2), LayerNorm, ReLU, optional projection of the embeddings.
Parameter names follow Hugging Face's."""
import torch
from torch import nn
from torch.nn import functional as F

from splitfuse.compiled.batch import Batch
from splitfuse.compiled.models.layers import Linear, blocked_attention
from splitfuse.compiled.models.sharded import ColumnLinear, RowLinear, VocabEmbedding, VocabLMHead, attention_heads
from splitfuse.compiled.parallel import SINGLE, Shard

_POSITION_OFFSET = 2  # OPT's position table reserves its first two rows


class OPTAttention(nn.Module):
    def __init__(self, config, shard: Shard):
        super().__init__()
        h = config.hidden_size
        heads = attention_heads(config.num_attention_heads, config.num_attention_heads, shard)
        self.num_heads = heads.q_count  # this rank's
        self.head_dim = h // config.num_attention_heads
        bias = getattr(config, "enable_bias", True)
        start, width = heads.q_start * self.head_dim, heads.q_count * self.head_dim
        self.q_proj = ColumnLinear(h, width, bias, start)
        self.k_proj = ColumnLinear(h, width, bias, start)
        self.v_proj = ColumnLinear(h, width, bias, start)
        self.out_proj = RowLinear(width, h, bias, start, shard)
        self.scale = self.head_dim ** -0.5

    def forward(self, x, batch: Batch, kv_cache):
        t, used = x.shape[0], batch.used()
        q = self.q_proj(x, used).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x, used).view(t, self.num_heads, self.head_dim)
        v = self.v_proj(x, used).view(t, self.num_heads, self.head_dim)
        return self.out_proj(blocked_attention(q, k, v, kv_cache, batch, self.scale, 0), used)


class OPTDecoderLayer(nn.Module):
    def __init__(self, config, shard: Shard):
        super().__init__()
        if config.activation_function != "relu":
            raise ValueError(f"unsupported OPT activation {config.activation_function!r}; supported: relu")
        h = config.hidden_size
        bias = getattr(config, "enable_bias", True)
        self.pre_norm = config.do_layer_norm_before
        self.self_attn = OPTAttention(config, shard)
        self.self_attn_layer_norm = nn.LayerNorm(h, elementwise_affine=config.layer_norm_elementwise_affine)
        start, ffn = shard.split(config.ffn_dim)
        self.fc1 = ColumnLinear(h, ffn, bias, start)
        self.fc2 = RowLinear(ffn, h, bias, start, shard)
        self.final_layer_norm = nn.LayerNorm(h, elementwise_affine=config.layer_norm_elementwise_affine)

    def forward(self, x, batch, kv_cache):
        h = self.self_attn_layer_norm(x) if self.pre_norm else x
        x = x + self.self_attn(h, batch, kv_cache)
        if not self.pre_norm:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if self.pre_norm else x
        used = batch.used()
        x = x + self.fc2(F.relu(self.fc1(h, used)), used)
        return x if self.pre_norm else self.final_layer_norm(x)


class OPTDecoder(nn.Module):
    def __init__(self, config, shard: Shard):
        super().__init__()
        proj = config.word_embed_proj_dim
        self.embed_tokens = VocabEmbedding(config.vocab_size, proj, shard)
        self.embed_positions = nn.Embedding(config.max_position_embeddings + _POSITION_OFFSET, config.hidden_size)
        self.project_in = Linear(proj, config.hidden_size, bias=False) if proj != config.hidden_size else None
        self.project_out = Linear(config.hidden_size, proj, bias=False) if proj != config.hidden_size else None
        # Post-norm OPT (350m) has no final norm.
        self.final_layer_norm = (nn.LayerNorm(config.hidden_size,
                                              elementwise_affine=config.layer_norm_elementwise_affine)
                                 if config.do_layer_norm_before else None)
        self.layers = nn.ModuleList(OPTDecoderLayer(config, shard) for _ in range(config.num_hidden_layers))


class OPTModel(nn.Module):
    def __init__(self, config, shard: Shard):
        super().__init__()
        self.decoder = OPTDecoder(config, shard)


class OPTForCausalLM(nn.Module):
    """Forward over a flat ragged batch; returns the final hidden states of batch.logits_indices (see
    LlamaForCausalLM)."""

    def __init__(self, config, shard: Shard = SINGLE):
        super().__init__()
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_kv_heads = attention_heads(config.num_attention_heads, config.num_attention_heads, shard).kv_count
        self.num_layers = config.num_hidden_layers
        self.max_model_len = config.max_position_embeddings
        self.sliding_window = 0
        self.model = OPTModel(config, shard)
        self.lm_head = VocabLMHead(config.word_embed_proj_dim, config.vocab_size, shard)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.decoder.embed_tokens.weight

    def forward(self, batch: Batch, kv_cache: torch.Tensor) -> torch.Tensor:
        d = self.model.decoder
        x = d.embed_tokens(batch.input_ids)
        if d.project_in is not None:
            x = d.project_in(x, batch.used())
        x = x + d.embed_positions(batch.positions + _POSITION_OFFSET)
        for i, layer in enumerate(d.layers):
            x = layer(x, batch, (kv_cache, i))
        x = x[batch.logits_indices]
        if d.final_layer_norm is not None:
            x = d.final_layer_norm(x)
        if d.project_out is not None:
            x = d.project_out(x)
        return x
