"""Phi-2 in plain PyTorch: embedding, parallel attention/MLP blocks with partial rotary embeddings, LM head.

Matches transformers' PhiForCausalLM (models/phi/modeling_phi.py) tensor for tensor, with HF's module
names minus the `model.` wrapper, so any weight can be grepped on both sides. Model card:
https://huggingface.co/microsoft/phi-2. The KV cache follows gpt-fast's (preallocated, one write per step),
one per sequence, so that a row of a batch attends to its own keys only.
Left out on purpose: qk_layernorm, RoPE scaling and tied embeddings (Phi-2 uses none of them), and any
model other than Phi-2.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import Phi2Config
from .fused import FastDropout, FastLinear, autocast_dtype, linear_cross_entropy


class KVCache:
    """One sequence's keys and values at every layer, preallocated: k[i], v[i] are (1, H_kv, max_len, D), and
    slots [0, length) hold its tokens so far.

    Each row of a batch has a cache of its own, and attends to its own keys only: never to padding, and never
    at another offset, so that its numbers are what the same sequence gets alone (phi2/generation.py).
    static=True keeps every shape fixed for torch.compile: the length is a device tensor, and attention runs
    over all max_len slots with the unwritten ones masked.
    """

    def __init__(self, config, max_len: int, dtype, device, static: bool = False):
        if max_len > config.block_size:
            raise ValueError(f"KV cache of {max_len} positions exceeds the context of {config.block_size}")
        shape = (1, config.n_kv_head, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.max_len, self.static = max_len, static
        self.length = torch.zeros((), dtype=torch.long, device=device) if static else 0

    def positions(self, T: int, device) -> torch.Tensor:
        """The positions (T,) of the next T tokens: their slots, and their rotary positions."""
        return self.length + torch.arange(T, device=device)

    def attend(self, layer: int, q, k, v, n_rep: int):
        """Write k, v (1, H_kv, T, D) after the sequence's tokens at this layer, and attend with q (1, H, T, D)
        over every key so far, causally; (1, H, T, D)."""
        T = q.size(2)
        if self.static:
            pos = self.positions(T, q.device)
            self.k[layer].index_copy_(2, pos, k)
            self.v[layer].index_copy_(2, pos, v)
            mask = torch.arange(self.max_len, device=q.device) <= pos[:, None]  # (T, S)
            return F.scaled_dot_product_attention(q, self.k[layer], self.v[layer], attn_mask=mask,
                                                  enable_gqa=n_rep > 1)
        n = self.length
        if n + T > self.max_len:
            raise ValueError(f"{n + T} tokens do not fit a KV cache of {self.max_len}")
        self.k[layer][:, :, n:n + T] = k
        self.v[layer][:, :, n:n + T] = v
        keys, values = self.k[layer][:, :, :n + T], self.v[layer][:, :, :n + T]  # (1, H_kv, S, D)
        # SDPA's is_causal aligns the triangle top-left: right only when the queries start at slot 0; a chunk
        # after earlier tokens gets the offset mask, and one token needs none
        mask = None if T == 1 or n == 0 else torch.ones(T, n + T, dtype=torch.bool, device=q.device).tril(n)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=T > 1 and n == 0,
                                              enable_gqa=n_rep > 1)

    def advance(self, T: int):
        """The last forward pass wrote T tokens at every layer."""
        if self.static:
            self.length.add_(T)
        else:
            self.length += T


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
    def __init__(self, config: Phi2Config, layer: int = 0):
        super().__init__()
        C, D = config.n_embd, config.head_dim
        self.n_head, self.n_kv_head, self.head_dim, self.layer = config.n_head, config.n_kv_head, D, layer
        self.q_proj = FastLinear(C, config.n_head * D)
        self.k_proj = FastLinear(C, config.n_kv_head * D)
        self.v_proj = FastLinear(C, config.n_kv_head * D)
        self.dense = FastLinear(config.n_head * D, C)
        self.attn_pdrop = config.attn_pdrop

    def forward(self, x, cos, sin, caches=None):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        # Phi-2 overflows fp16 if q.k and softmax run in half precision (HF upcasts for this reason): SDPA's
        # fused CPU/CUDA kernels accumulate both in fp32 and its math fallback upcasts half inputs, which
        # tests/test_model.py checks.
        n_rep = self.n_head // self.n_kv_head
        if caches is None:  # training, or a whole sequence at once: causal over the sequence
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_pdrop if self.training else 0.0,
                                               is_causal=T > 1, enable_gqa=n_rep > 1)  # (B, H, T, D)
        else:  # decoding: each row over its own cached keys (a padding row, without a cache, gets zeros)
            y = torch.cat([q.new_zeros(1, *q.shape[1:]) if cache is None else
                           cache.attend(self.layer, q[r:r + 1], k[r:r + 1], v[r:r + 1], n_rep)
                           for r, cache in enumerate(caches)])  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, C)
        return self.dense(y)


class MLP(nn.Module):
    def __init__(self, config: Phi2Config):
        super().__init__()
        self.fc1 = FastLinear(config.n_embd, config.intermediate_size)
        self.fc2 = FastLinear(config.intermediate_size, config.n_embd)

    def forward(self, x):
        # Phi-2's "gelu_new" is gelu with the tanh approximation
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    """One Phi-2 layer: a single LayerNorm feeds attention and the MLP side by side.

        x ──┬──────────────────────────────┐
            └─ LayerNorm ──┬─ attention ─(+)─┐
                           └─ MLP ─────────(+)──> x + attn(ln(x)) + mlp(ln(x))
    """

    def __init__(self, config: Phi2Config, layer: int = 0):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.n_embd, eps=config.norm_eps)
        self.self_attn = Attention(config, layer)
        self.mlp = MLP(config)
        self.resid_dropout = FastDropout(config.resid_pdrop)

    def forward(self, x, cos, sin, caches=None):
        h = self.input_layernorm(x)  # fp32 under autocast, which keeps layer_norm in fp32
        if autocast_dtype(h):  # cast once, not in each of the 4+ Linears that read h
            h = h.to(autocast_dtype(h))
        attn = self.resid_dropout(self.self_attn(h, cos, sin, caches))
        mlp = self.resid_dropout(self.mlp(h))
        return attn.add_(mlp).add_(x)  # attn + mlp + x, HF's order, summed in place (no backward needs attn)


class Phi2(nn.Module):
    def __init__(self, config: Phi2Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.embed_dropout = FastDropout(config.embd_pdrop)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.final_layernorm = nn.LayerNorm(config.n_embd, eps=config.norm_eps)
        self.lm_head = FastLinear(config.n_embd, config.vocab_size)  # not tied to embed_tokens
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

    def new_cache(self, max_len: int, static: bool = False) -> KVCache:
        """An empty KV cache for one sequence of up to max_len tokens, in the model's dtype and device."""
        return KVCache(self.config, max_len, self.lm_head.weight.dtype, self.lm_head.weight.device, static)

    def hidden_states(self, idx, caches=None):
        """Final-LayerNorm output (B, T, C) for token ids idx (B, T).

        caches: None for the training path (each row a whole sequence from position 0, causal); or one KVCache
        per row, which this call extends by the row's T tokens (their positions follow what it holds), or None
        for a padding row, whose output is meaningless.
        """
        B, T = idx.shape
        if caches is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens exceeds the context of {self.config.block_size}")
            pos = torch.arange(T, device=idx.device)[None]  # (1, T)
        else:
            zeros = torch.zeros(T, dtype=torch.long, device=idx.device)
            pos = torch.stack([zeros if c is None else c.positions(T, idx.device) for c in caches])  # (B, T)
        cos = self.rope_cos[pos].unsqueeze(1)  # (B or 1, 1, T, R)
        sin = self.rope_sin[pos].unsqueeze(1)

        x = self.embed_dropout(self.embed_tokens(idx))  # (B, T, C)
        for block in self.layers:
            if self.gradient_checkpointing and self.training:
                # non-reentrant: the frozen input of the first block carries no grad
                x = checkpoint(block, x, cos, sin, caches, use_reentrant=False)
            else:
                x = block(x, cos, sin, caches)
        for cache in caches or ():
            if cache is not None:
                cache.advance(T)
        return self.final_layernorm(x)

    def forward(self, idx, caches=None):
        """Logits (B, T, V) for token ids idx (B, T); caches as in hidden_states."""
        return self.lm_head(self.hidden_states(idx, caches))

    def loss(self, idx, labels):
        """Summed next-token cross-entropy and the number of tokens it covers, for idx and labels (B, T)
        where labels are -100 (ignored) on positions with no token to predict.

        The LM head runs only where there is a token to predict: with the prompt masked, that skips most rows of
        the (N, 51200) logits, the largest activation of a training step. The same value, written plainly
        (tests/test_model.py checks the two against each other):

            logits = self(idx)[:, :-1]  # (B, T-1, V): position t predicts token t+1
            F.cross_entropy(logits.flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")
        """
        h, next_ids = answer_rows(self.hidden_states(idx[:, :-1]), labels)  # position t predicts token t+1
        return linear_cross_entropy(h, self.lm_head.weight, self.lm_head.bias, next_ids), len(next_ids)


def answer_rows(h, labels):
    """The hidden states (N, C) of the positions that have a label, and the ids they predict (N,), for
    h (B, T-1, C) and labels (B, T). Labels of -100 (cross_entropy's ignore_index) mark none; dropping those
    rows before the head rather than after it skips their logits. Labels may stay on the CPU, where the rows are found
    without waiting for the device to finish the forward pass."""
    next_ids = labels[:, 1:].reshape(-1)  # (B * (T-1),)
    rows = (next_ids != -100).nonzero().squeeze(1)  # (N,)
    picked = h.reshape(-1, h.size(-1)).index_select(0, rows.to(h.device, non_blocking=True))  # (N, C)
    return picked, next_ids[rows].to(h.device, non_blocking=True)
