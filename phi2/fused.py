"""Kernels that exist for speed, apart from the architecture in model.py. Each gives the same numbers as
the plain PyTorch it replaces, up to the order of its sums (dropout: the same distribution from other random
draws; tests/test_model.py checks each against it), and
was kept because it was measured to pay (docs/speed.md; bench/generation.py, bench/train_step.py):

- `FastLinear`: nn.Linear with faster paths for the few rows of batched decoding on the CPU, where the BLAS
  kernels behind F.linear are slow for a handful of rows.
- `dropout`: the same Bernoulli mask drawn through the gaps between dropped elements, p*n random numbers
  instead of n, which are most of F.dropout's cost on a CPU, and kept for backward as the dropped indices
  where they are smaller than a bool mask.
  On other devices it is F.dropout, whose fused kernel needs no host synchronisation.
- `linear_cross_entropy`: the LM head and the loss in one step, in row chunks, with the gradients made while
  each chunk's logits are at hand: one chunk of logits at a time unless the head's own weight trains (its
  weight gradient needs all N rows), no (N, 51200) fp32 softmax, and a low-rank head update that stays
  factorised.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# oneDNN's inner product as torch exposes it (torch.ops.mkldnn._linear_pointwise), for fp32 on x86 CPUs
# only: measured there
ONEDNN_FP32 = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
               and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast runs matmuls in on x's device, or None where it is off (or absent, as on meta)."""
    kind = x.device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


class FastLinear(nn.Linear):
    """nn.Linear, plus fast paths for the few rows of batched decoding on the CPU.

    The CPU matmuls behind F.linear (x @ W.T) are slow when x has only a few rows: oneDNN's for bf16/fp16
    and MKL's for fp32 on the AMD CPUs measured. The same product with the weight as the left operand,
    W @ x.T, was no slower anywhere measured and several times faster there, up to about 256 rows; for one
    half-precision row, torch.addmv's kernel reads the weight faster than F.linear. Small fp32 weights keep
    F.linear, whose lower overhead wins there. Without gradients (decoding, evaluation) a large fp32 weight
    goes through oneDNN's inner product on x86 instead, at any row count: 1.1-2.8x faster than MKL's W @ x.T
    at 2-64 rows, and it sums a row the same way at 2-64 rows where MKL does so only from 12 rows on, so
    decoding pads less (docs/speed.md). It has no backward, so gradients keep MKL; autocast keeps the paths
    autocast knows, and torch.compile the plain matmul (inductor lowers oneDNN's op for frozen weights only);
    torch.backends.mkldnn.flags(enabled=False) turns it off. Every path accumulates in fp32; only the order of
    the sums differs, which is why decoding pads its rows to counts measured to be row-invariant
    (phi2/generation.py), in the grad mode decoding runs in (Batch's methods run under inference_mode).
    """

    def forward(self, x):
        rows = x.numel() // self.in_features
        if x.is_cpu and x.dtype == self.weight.dtype and self.bias is not None and x.shape[-1] == self.in_features:
            half = x.dtype in (torch.bfloat16, torch.float16)
            if half and rows == 1:
                return torch.addmv(self.bias, self.weight, x.reshape(-1)).view(*x.shape[:-1], -1)
            big = x.dtype == torch.float32 and self.weight.numel() >= 1 << 20
            if (big and ONEDNN_FP32 and torch.backends.mkldnn.enabled and not torch.is_grad_enabled()
                    and autocast_dtype(x) is None and not torch.compiler.is_compiling()):
                return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
            if (half and rows <= 8) or (big and 2 <= rows <= 256):
                y = torch.addmm(self.bias[:, None], self.weight, x.reshape(rows, -1).t())  # (out, rows)
                # a copy, small beside the weight: a transposed view would halve the speed of the next
                # Linear (x.t() row-major is the slow operand layout) and of the ops that read rows
                return y.t().contiguous().view(*x.shape[:-1], -1)
        return super().forward(x)


INDICES_UP_TO = 0.125  # up to this p, the dropped indices (8p bytes an element) are smaller than a bool mask


def dropout(x, p: float, training: bool = True):
    """F.dropout with a cheaper random mask of exactly the same distribution.

    In an iid Bernoulli(p) sequence the gaps between dropped elements are geometric(p), so drawing the
    gaps takes about p*n random numbers where F.dropout draws n, one per element; on CPUs those draws
    are most of its cost (tests/test_model.py checks the statistics). Backward keeps what is smaller: the
    dropped indices (8p bytes an element) up to p = 1/8, above it a bool mask (one byte). A kept element
    is x * (1 / (1 - p)), rounded once to x's dtype (in fp32 what F.dropout gives); a dropped one is +0.0,
    even where x is negative, infinite or NaN.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability {p}: use a number in [0, 1]")
    if not training or p == 0.0:
        return x
    if not x.is_cpu:  # the device's fused kernel: no mask in memory, no host synchronisation
        return F.dropout(x, p, training)
    if p == 1.0:
        return torch.zeros_like(x)
    n, scale = x.numel(), 1.0 / (1.0 - p)
    drops = dropped_indices(n, p)
    if p <= INDICES_UP_TO:
        # scaled into a fresh tensor, then the drops zeroed: two vectorised passes (torch.where with a bool
        # mask runs element by element), and the backward of index_fill_ needs the indices alone
        return (x.reshape(-1) * scale).index_fill_(0, drops, 0.0).view(x.shape)
    keep = torch.ones(n, dtype=torch.bool)
    keep[drops] = False
    # where, not x * keep: a bool mask times x is cast to x's dtype, forward and backward; then in place: one
    # temporary of x's size, not two
    return torch.where(keep.view(x.shape), x, 0.0).mul_(scale)


def dropped_indices(n: int, p: float) -> torch.Tensor:
    """The indices, ascending, of the dropped elements of n iid Bernoulli(p) trials, drawn as geometric gaps."""
    log_q = math.log1p(-p)
    chunks, last = [], -1  # last: the index of the last drop so far
    while last < n:
        expected = (n - last) * p  # draw enough gaps to pass the end, almost always at the first try
        k = int(expected + 6 * expected**0.5 + 16)
        # geometric(p) by inversion, trials to a drop: floor(log(v) / log(1 - p)) + 1 >= 1 for v = 1 - u,
        # uniform in (0, 1]; in float64, whose sums of whole numbers are exact up to 2**53
        gaps = torch.rand(k, dtype=torch.float64).neg_().log1p_().div_(log_q).floor_().add_(1)
        drops = gaps.cumsum_(0).add_(last)
        last = int(drops[-1])
        chunks.append(drops[: int(torch.searchsorted(drops, n))])  # those before the end
    return (chunks[0] if len(chunks) == 1 else torch.cat(chunks)).long()


class FastDropout(nn.Dropout):
    """nn.Dropout through `dropout` above."""

    def forward(self, x):
        return dropout(x, self.p, self.training)


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i W^T + b + s (h_i A^T) B^T, t_i) for h (N, C), one chunk of (N, V) logits at a time.

    The gradient of the loss with respect to the logits is softmax - onehot, so each chunk of rows gets
    its gradients for h, W and b right in the forward pass, while its logits are at hand (the idea of
    Liger-Kernel's fused linear cross-entropy); backward only scales them. Matmuls run in `dtype` (bf16
    under autocast) and the softmax in fp32, as the plain autocast path does.
    Each chunk reads the whole weight, so a chunk has at least C/4 rows: Phi-2's 2560-wide head (262 MB in
    bf16) does not stay in cache, reading it is what costs, and 640-row chunks take a third less time than
    81-row ones. The fp32 softmax then goes through the chunk's logits a few rows at a time, so that its
    temporaries stay in cache, and writes the gradient over the logits: it makes no (n, V) fp32 tensor of its
    own. Only when W itself trains (stage 2's full head copy) are all N rows kept, in `dtype`, for the dW GEMM.
    The optional rank-r update s B A of the weight (a low-rank head, head_adapter.py) stays factorised:
    its terms cost N V r multiplies where the (V, C) product B A would cost V C r and a dW GEMM N V C.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, next_ids, dtype, lora_A=None, lora_B=None, scaling=1.0):
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
            hc, t = h[rows].to(dtype), next_ids[rows]
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


def softmax_cross_entropy_(logits, next_ids, grad: bool, grad_bias=None):
    """sum_i -log softmax(logits_i)[t_i] in fp32 for logits (n, V) and next_ids (n,). With grad, logits is
    overwritten with the loss's gradient softmax - onehot, whose column sums are added to grad_bias if given.
    On a CPU a few rows at a time, so that 2 MB of fp32 stays in cache through the softmax's passes; on a GPU,
    where each piece's dozen kernels cost a launch each, pieces of 128 MB of fp32 (655 rows of Phi-2's)."""
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    step = max(1, (2**19 if logits.is_cpu else 2**25) // logits.size(1))  # rows
    for i in range(0, logits.size(0), step):
        z, t = logits[i:i + step], next_ids[i:i + step]
        logp = z.float().log_softmax(dim=-1)  # (k, V)
        total -= logp.gather(1, t[:, None]).sum()
        if grad:
            g = logp.exp_()  # softmax, in place
            g[torch.arange(len(t), device=t.device), t] -= 1.0
            if grad_bias is not None:
                grad_bias += g.sum(dim=0)
            z.copy_(g)
    return total


def linear_cross_entropy(h, weight, bias, next_ids, low_rank=None):
    """Summed cross-entropy of the logits h @ weight.T + bias (N, V) against next_ids (N,).
    low_rank: optional (A (r, C), B (V, r), s), adding s * (h @ A.T) @ B.T to the logits."""
    dtype = autocast_dtype(h) or weight.dtype
    inputs = (h, weight, bias, next_ids, *(low_rank or ()))
    if not torch.is_grad_enabled():  # validation: needs_input_grad ignores no_grad, so no gradient work
        inputs = [x.detach() if isinstance(x, torch.Tensor) else x for x in inputs]
    return LinearCrossEntropy.apply(*inputs[:4], dtype, *inputs[4:])
