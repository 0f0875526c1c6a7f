"""Phi-2 in plain PyTorch: embedding, parallel attention/MLP blocks with partial rotary embeddings, LM head.

Matches transformers' PhiForCausalLM (models/phi/modeling_phi.py) tensor for tensor, with HF's module
names minus the `model.` wrapper, so any weight can be grepped on both sides. Model card:
https://huggingface.co/microsoft/phi-2. The KV cache follows gpt-fast's (preallocated, one write per step).
Left out on purpose: qk_layernorm, RoPE scaling and tied embeddings (Phi-2 uses none of them), and any
model other than Phi-2.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import Phi2Config
from .fused import Dropout, Linear, autocast_dtype, linear_cross_entropy


class KVCache(nn.Module):
    """Preallocated keys and values of one attention layer, each (B, H_kv, max_len, D)."""

    def __init__(self, batch_size, max_len, n_kv_head, head_dim, dtype, device=None):
        super().__init__()
        shape = (batch_size, n_kv_head, max_len, head_dim)
        # non-persistent: a cache is scratch memory and never part of a checkpoint
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v, kv_len):
        """Write k, v (B, H_kv, T, D) at slots input_pos (T,); return slots [0, kv_len) of both."""
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k[:, :, :kv_len], self.v[:, :, :kv_len]  # (B, H_kv, S, D)


def rotate_half(x):
    """(x1, x2) -> (-x2, x1) on the last dim: the rotate-half form of RoPE used by HF's Phi."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """Rotate the first R dims of each head of x (B, H, T, D); cos, sin are (B or 1, 1, T, R)."""
    R = cos.size(-1)
    x_rot, x_pass = x[..., :R], x[..., R:]
    x_rot = x_rot * cos + rotate_half(x_rot) * sin
    return torch.cat((x_rot, x_pass), dim=-1)  # (B, H, T, D)


class Attention(nn.Module):
    def __init__(self, config: Phi2Config):
        super().__init__()
        C, D = config.n_embd, config.head_dim
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, D
        self.q_proj = Linear(C, config.n_head * D)
        self.k_proj = Linear(C, config.n_kv_head * D)
        self.v_proj = Linear(C, config.n_kv_head * D)
        self.dense = Linear(config.n_head * D, C)
        self.attn_pdrop = config.attn_pdrop
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, mask=None, input_pos=None, kv_len=None):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v, kv_len)  # (B, H_kv, S, D)

        # SDPA's is_causal masks the top-left triangle, which is right only when queries and keys are the
        # same positions (training, or a prefill from slot 0); other cases come with an explicit mask, and
        # a one-token decode step needs none. Phi-2 overflows fp16 if q.k and softmax run in half
        # precision (HF upcasts for this reason): SDPA's fused CPU/CUDA kernels accumulate both in fp32
        # and its math fallback upcasts half inputs, which tests/test_model.py checks.
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=mask,
            dropout_p=self.attn_pdrop if self.training else 0.0,
            is_causal=mask is None and T > 1,
            enable_gqa=self.n_kv_head != self.n_head,
        )  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, C)
        return self.dense(y)


class MLP(nn.Module):
    def __init__(self, config: Phi2Config):
        super().__init__()
        self.fc1 = Linear(config.n_embd, config.intermediate_size)
        self.fc2 = Linear(config.intermediate_size, config.n_embd)

    def forward(self, x):
        # Phi-2's "gelu_new" is gelu with the tanh approximation
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    """One Phi-2 layer: a single LayerNorm feeds attention and the MLP side by side.

        x ──┬──────────────────────────────┐
            └─ LayerNorm ──┬─ attention ─(+)─┐
                           └─ MLP ─────────(+)──> x + attn(ln(x)) + mlp(ln(x))
    """

    def __init__(self, config: Phi2Config):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.n_embd, eps=config.norm_eps)
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.resid_dropout = Dropout(config.resid_pdrop)

    def forward(self, x, cos, sin, mask=None, input_pos=None, kv_len=None):
        h = self.input_layernorm(x)  # fp32 under autocast, which keeps layer_norm in fp32
        if autocast_dtype(h):  # cast once, not in each of the 4+ Linears that read h
            h = h.to(autocast_dtype(h))
        attn = self.resid_dropout(self.self_attn(h, cos, sin, mask, input_pos, kv_len))
        mlp = self.resid_dropout(self.mlp(h))
        return attn.add_(mlp).add_(x)  # attn + mlp + x, HF's order, summed in place (no backward needs attn)


class Phi2(nn.Module):
    def __init__(self, config: Phi2Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.embed_dropout = Dropout(config.embd_pdrop)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.final_layernorm = nn.LayerNorm(config.n_embd, eps=config.norm_eps)
        self.lm_head = Linear(config.n_embd, config.vocab_size)  # not tied to embed_tokens
        self.gradient_checkpointing = False
        R = config.rotary_dim
        self.register_buffer("rope_cos", torch.empty(config.block_size, R), persistent=False)
        self.register_buffer("rope_sin", torch.empty(config.block_size, R), persistent=False)
        if self.rope_cos.device.type != "meta":
            self.init_rope()

    @torch.no_grad()
    def init_rope(self):
        """Fill the cos/sin tables (block_size, R): computed in fp32 as HF does, stored in the model's dtype."""
        R = self.config.rotary_dim
        inv_freq = 1.0 / (self.config.rope_base ** (torch.arange(0, R, 2, dtype=torch.float) / R))  # (R/2,)
        t = torch.arange(self.config.block_size, dtype=torch.float)
        freqs = torch.outer(t, inv_freq)  # (block_size, R/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (block_size, R): rotate-half pairs dim i with i + R/2
        self.rope_cos.copy_(emb.cos())
        self.rope_sin.copy_(emb.sin())

    @torch.no_grad()
    def init_weights(self, generator=None):
        """Random init as transformers does for Phi: N(0, 0.02) weights, zero biases, unit LayerNorms."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, 0.02, generator=generator)
            if isinstance(m, nn.Linear):
                m.bias.zero_()
            if isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()
        self.init_rope()

    def setup_kv_cache(self, batch_size, max_len, dtype=None, device=None):
        """Give every attention layer a cache for up to max_len positions."""
        if max_len > self.config.block_size:
            raise ValueError(f"KV cache of {max_len} positions exceeds the context of {self.config.block_size}")
        dtype = dtype or self.lm_head.weight.dtype
        device = device or self.lm_head.weight.device
        for block in self.layers:
            attn = block.self_attn
            attn.kv_cache = KVCache(batch_size, max_len, attn.n_kv_head, attn.head_dim, dtype, device)

    def clear_kv_cache(self):
        self.set_kv_caches([None] * len(self.layers))

    def kv_caches(self) -> list[KVCache | None]:
        """Each layer's cache, to set back later (serve.py prefills joining rows in caches of their own)."""
        return [block.self_attn.kv_cache for block in self.layers]

    def set_kv_caches(self, caches: list[KVCache | None]):
        for block, cache in zip(self.layers, caches, strict=True):
            block.self_attn.kv_cache = cache

    def hidden_states(self, idx, input_pos=None, mask=None, position_ids=None, kv_len=None):
        """Final-LayerNorm output (B, T, C) for token ids idx (B, T).

        input_pos: (T,) cache slots to write, or None for the training path (no cache).
        mask: optional bool (B, 1, T, S), True where a query may attend a key; S = input_pos[-1] + 1.
        position_ids: optional (B, T) rotary positions, for left-padded rows; default input_pos or 0..T-1.
        kv_len: S, the cache slots in use after this call, as a Python int; given, it spares reading
        input_pos back from the device (a wait on a GPU at every decoding step).
        """
        B, T = idx.shape
        if input_pos is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens exceeds the context of {self.config.block_size}")
            kv_len, pos = None, torch.arange(T, device=idx.device)
        else:
            if self.layers[0].self_attn.kv_cache is None:
                raise RuntimeError("input_pos given but no KV cache: call model.setup_kv_cache() first")
            kv_len, pos = kv_len or int(input_pos[-1]) + 1, input_pos
            if mask is None and T > 1 and kv_len != T:  # a chunk after slot 0: causal with an offset
                mask = input_pos[:, None] >= torch.arange(kv_len, device=idx.device)  # (T, S)
        pos = (pos if position_ids is None else position_ids).view(-1, T)  # (B or 1, T)
        cos = self.rope_cos[pos].unsqueeze(1)  # (B or 1, 1, T, R)
        sin = self.rope_sin[pos].unsqueeze(1)

        x = self.embed_dropout(self.embed_tokens(idx))  # (B, T, C)
        for block in self.layers:
            if self.gradient_checkpointing and self.training:
                # non-reentrant: the frozen input of the first block carries no grad
                x = checkpoint(block, x, cos, sin, mask, input_pos, kv_len, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, input_pos, kv_len)
        return self.final_layernorm(x)

    def forward(self, idx, input_pos=None, mask=None, position_ids=None, kv_len=None):
        """Logits (B, T, V) for token ids idx (B, T); arguments as in hidden_states."""
        return self.lm_head(self.hidden_states(idx, input_pos, mask, position_ids, kv_len))

    def loss(self, idx, labels):
        """Summed next-token cross-entropy and the number of tokens it covers, for idx and labels (B, T)
        where labels are -100 (ignored) on positions without a target.

        The LM head runs only where there is a target: with the prompt masked, that skips most rows of
        the (N, 51200) logits, the largest activation of a training step.
        """
        h, targets = answer_rows(self.hidden_states(idx[:, :-1]), labels)  # position t predicts token t+1
        return linear_cross_entropy(h, self.lm_head.weight, self.lm_head.bias, targets), len(targets)


def answer_rows(h, labels):
    """The hidden states (N, C) of the positions that have a target, and the targets (N,), for h (B, T-1, C)
    and labels (B, T). Labels of -100 (cross_entropy's ignore_index) have none; dropping them before the
    head rather than after it skips their logits. Labels may stay on the CPU, where the rows are found
    without waiting for the device to finish the forward pass."""
    targets = labels[:, 1:].reshape(-1)  # (B * (T-1),)
    rows = (targets != -100).nonzero().squeeze(1)  # (N,)
    picked = h.reshape(-1, h.size(-1)).index_select(0, rows.to(h.device, non_blocking=True))  # (N, C)
    return picked, targets[rows].to(h.device, non_blocking=True)
