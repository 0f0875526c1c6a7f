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


class Linear(nn.Linear):
    """nn.Linear, plus fast paths for a few rows of bf16/fp16 input on the CPU (decoding).

    oneDNN's half-precision matmul behind F.linear is slow when the input has only a few rows. For one
    row, torch.addmv's kernel reaches about twice its bandwidth. For 2 to 8 rows, the same matmul with the
    weight as the left operand, W @ x.T, is 1.3-1.5x faster on Phi-2's layer shapes and no slower on
    small ones. Both accumulate in fp32 (bench/generation.py measures the effect).
    """

    def forward(self, x):
        rows = x.numel() // self.in_features
        if rows <= 8 and x.dtype == self.weight.dtype != torch.float32 and x.is_cpu:
            if rows == 1:
                return torch.addmv(self.bias, self.weight, x.reshape(-1)).view(*x.shape[:-1], -1)
            y = torch.addmm(self.bias[:, None], self.weight, x.reshape(rows, -1).t())  # (out, rows)
            return y.t().reshape(*x.shape[:-1], -1)
        return super().forward(x)


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


def dropout(x, p: float, training: bool = True):
    """F.dropout with a cheaper random mask of exactly the same distribution.

    In an iid Bernoulli(p) sequence the gaps between dropped elements are geometric(p), so drawing the
    gaps takes about p*n random numbers where F.dropout draws n, one per element; on CPUs those draws
    are most of its cost (3.5x faster at p = 0.05 here; tests/test_model.py checks the statistics).
    """
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return torch.zeros_like(x)
    n = x.numel()
    keep = torch.ones(n, dtype=torch.bool, device=x.device)
    last = -1  # index of the last dropped element so far
    while last < n:
        expected = (n - last) * p  # draw enough gaps to pass the end, almost always at the first try
        k = int(expected + 6 * expected**0.5 + 16)
        gaps = torch.empty(k, dtype=torch.float64, device=x.device).geometric_(p)  # trials to a drop, >= 1
        drops = last + gaps.long().cumsum(0)
        keep[drops[drops < n]] = False
        last = int(drops[-1])
    return (x * keep.view(x.shape)).mul_(1.0 / (1.0 - p))  # in place: one temporary of x's size, not two


class Dropout(nn.Dropout):
    """nn.Dropout through `dropout` above."""

    def forward(self, x):
        return dropout(x, self.p, self.training)


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i W^T + b + s (h_i A^T) B^T, t_i) for h (N, C), without keeping the (N, V) logits.

    The gradient of the loss with respect to the logits is softmax - onehot, so each chunk of rows gets
    its gradients for h, W and b right in the forward pass, while its logits are at hand (the idea of
    Liger-Kernel's fused linear cross-entropy); backward only scales them. Matmuls run in `dtype` (bf16
    under autocast) and the softmax in fp32, as the plain autocast path does.
    Each chunk reads the whole weight, so a chunk has at least C/4 rows: Phi-2's 2560-wide head (262 MB in
    bf16) does not stay in cache, reading it is what costs, and 640-row chunks take a third less time than
    81-row ones. The fp32 softmax then goes through the chunk's logits a few rows at a time, so that its
    temporaries stay in cache, and writes the gradient over the logits: no (n, V) fp32 tensor is ever made.
    The optional rank-r update s B A of the weight (a low-rank head, head_adapter.py) stays factorised:
    its terms cost N V r multiplies where the (V, C) product B A would cost V C r and a dW GEMM N V C.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, dtype, lora_A=None, lora_B=None, scaling=1.0):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        low_rank = lora_A is not None
        need_ab = low_rank and any(ctx.needs_input_grad[5:7])
        need_grad = need_h or need_w or need_b or need_ab
        N, V = h.size(0), weight.size(0)
        chunk = max(2**22 // V, h.size(1) // 4)  # rows: see the docstring
        W, b = weight.to(dtype), bias.to(dtype)
        # the logits, then dloss/dlogits in their place: all N rows when a dW GEMM needs them, else one chunk's
        logits_all = torch.empty(N if need_w else min(N, chunk), V, dtype=dtype, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        grad_u = grad_A = grad_B = None
        if low_rank:
            A, B = lora_A.to(dtype), lora_B.to(dtype)  # (r, C), (V, r)
            u = F.linear(h.to(dtype), A) * scaling  # (N, r): the rank-r path's input to B
            grad_u = torch.empty_like(u) if need_ab or need_h else None  # dloss/du (N, r)
            grad_B = torch.zeros_like(lora_B, dtype=torch.float32) if need_ab else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, N, chunk):
            rows = slice(start, start + chunk)
            hc, t = h[rows].to(dtype), targets[rows]
            logits = logits_all[rows] if need_w else logits_all[: len(t)]  # (n, V)
            torch.addmm(b, hc, W.t(), out=logits)
            if low_rank:
                logits.addmm_(u[rows], B.t())
            total += softmax_cross_entropy_(logits, t, need_grad, grad_b)  # logits now hold dloss/dlogits
            if need_h:
                grad_h[rows] = logits @ W  # (n, C)
            if grad_u is not None:
                grad_u[rows] = logits @ B  # (n, r)
                if need_ab:
                    grad_B += logits.t() @ u[rows]  # (V, r), summed over chunks in fp32
        grad_w = None
        if need_w:
            # all N rows in one product, not one per chunk (each would read and write the whole (V, C) gradient),
            # made a few thousand vocabulary rows at a time and cast to the weight's dtype slice by slice
            grad_w, hd = torch.empty_like(weight), h.to(dtype)
            step = max(1, 2**23 // h.size(1))  # vocabulary rows: 8M numbers
            for v in range(0, V, step):
                grad_w[v:v + step] = logits_all[:, v:v + step].t() @ hd  # (step, C)
        grad_b = grad_b.to(bias.dtype) if need_b else None  # gradients in their parameters' dtypes
        if grad_u is not None:
            grad_u = grad_u * scaling  # through u = s h A^T
            if need_h:
                grad_h += (grad_u @ A).to(h.dtype)
            if need_ab:
                grad_A = (grad_u.t() @ h.to(dtype)).to(lora_A.dtype)  # (r, C)
                grad_B = grad_B.to(lora_B.dtype)
        ctx.grads = grad_h, grad_w, grad_b, grad_A, grad_B  # made here, not inputs: no need to save them
        return total

    @staticmethod
    def backward(ctx, grad_out):
        # scaled in place and handed over (a full head's gradient is 131M numbers): backward runs once
        grads, ctx.grads = ctx.grads, None
        gh, gw, gb, ga, gB = [None if g is None else g.mul_(grad_out) for g in grads]
        return gh, gw, gb, None, None, ga, gB, None


def softmax_cross_entropy_(logits, targets, grad: bool, grad_bias=None):
    """sum_i -log softmax(logits_i)[t_i] in fp32 for logits (n, V) and targets (n,). With grad, logits is
    overwritten with the loss's gradient softmax - onehot, whose column sums are added to grad_bias if given.
    A few rows at a time: 2 MB of fp32 stays in cache through the softmax's passes."""
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    step = max(1, 2**19 // logits.size(1))  # rows
    for i in range(0, logits.size(0), step):
        z, t = logits[i:i + step], targets[i:i + step]
        logp = z.float().log_softmax(dim=-1)  # (k, V)
        total -= logp.gather(1, t[:, None]).sum()
        if grad:
            g = logp.exp_()  # softmax, in place
            g[torch.arange(len(t), device=t.device), t] -= 1.0
            if grad_bias is not None:
                grad_bias += g.sum(dim=0)
            z.copy_(g)
    return total


def linear_cross_entropy(h, weight, bias, targets, low_rank=None):
    """Summed cross-entropy of the logits h @ weight.T + bias (N, V) against targets (N,).
    low_rank: optional (A (r, C), B (V, r), s), adding s * (h @ A.T) @ B.T to the logits."""
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    inputs = (h, weight, bias, targets, *(low_rank or ()))
    if not torch.is_grad_enabled():  # validation: needs_input_grad ignores no_grad, so no gradient work
        inputs = [x.detach() if isinstance(x, torch.Tensor) else x for x in inputs]
    return LinearCrossEntropy.apply(*inputs[:4], dtype, *inputs[4:])


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
        if torch.is_autocast_enabled(h.device.type):  # cast once, not in each of the 4+ Linears that read h
            h = h.to(torch.get_autocast_dtype(h.device.type))
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
        self.head_adapter = None  # stage 2: a head_adapter.HeadAdapter used in place of lm_head, if attached
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
        for block in self.layers:
            block.self_attn.kv_cache = None

    def hidden_states(self, idx, input_pos=None, mask=None, position_ids=None):
        """Final-LayerNorm output (B, T, C) for token ids idx (B, T).

        input_pos: (T,) cache slots to write, or None for the training path (no cache).
        mask: optional bool (B, 1, T, S), True where a query may attend a key; S = input_pos[-1] + 1.
        position_ids: optional (B, T) rotary positions, for left-padded rows; default input_pos or 0..T-1.
        """
        B, T = idx.shape
        if input_pos is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens exceeds the context of {self.config.block_size}")
            kv_len, pos = None, torch.arange(T, device=idx.device)
        else:
            if self.layers[0].self_attn.kv_cache is None:
                raise RuntimeError("input_pos given but no KV cache: call model.setup_kv_cache() first")
            kv_len, pos = int(input_pos[-1]) + 1, input_pos
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

    @property
    def output_head(self):
        """The module that maps final hidden states to logits: lm_head, or an attached head adapter."""
        return self.lm_head if self.head_adapter is None else self.head_adapter

    def forward(self, idx, input_pos=None, mask=None, position_ids=None):
        """Logits (B, T, V) for token ids idx (B, T); arguments as in hidden_states."""
        return self.output_head(self.hidden_states(idx, input_pos, mask, position_ids))

    def loss(self, idx, labels):
        """Summed next-token cross-entropy and the number of tokens it covers, for idx and labels (B, T)
        where labels are -100 (ignored) on positions without a target.

        The LM head runs only where there is a target: with the prompt masked, that skips most rows of
        the (N, 51200) logits, the largest activation of a training step.
        """
        h = self.hidden_states(idx[:, :-1])  # (B, T-1, C): position t predicts token t+1
        targets = labels[:, 1:]
        keep = targets != -100  # cross_entropy's ignore_index, applied before the head instead of after it
        if self.head_adapter is not None:
            loss = self.head_adapter.loss(h[keep], targets[keep])
        else:
            loss = linear_cross_entropy(h[keep], self.lm_head.weight, self.lm_head.bias, targets[keep])
        return loss, int(keep.sum())
