"""The model against transformers' PhiForCausalLM, and its own invariants (cache, causality, checkpointing)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import phi2
from phi2.model import Attention
from tests.conftest import skip_emulated_bf16


def _tokens(config, B=2, T=37):
    return torch.randint(0, config.vocab_size, (B, T))


class Ops(TorchDispatchMode):
    """Records the name of every op that runs inside it (`with Ops() as ops: ...; ops.names`)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def test_fp32_logits_match_transformers(hf_reference):
    config, folder, hf = hf_reference
    ours = phi2.load_model(folder)
    x = _tokens(config)
    ref = hf(x).logits
    out = ours(x)
    assert out.shape == (2, 37, config.vocab_size)
    assert (out - ref).abs().max().item() <= 1e-4


@torch.no_grad()
def test_bf16_logits_close_to_transformers(hf_reference):
    transformers = pytest.importorskip("transformers")
    config, folder, hf = hf_reference
    skip_emulated_bf16(config)
    x = _tokens(config)
    exact = hf(x).logits
    hf_bf16 = transformers.PhiForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    ours = phi2.load_model(folder, dtype=torch.bfloat16)
    assert ours.lm_head.weight.dtype == torch.bfloat16
    ref, out = hf_bf16(x).logits.float(), ours(x).float()
    # ours is as close to the fp32 truth as transformers' own bf16 run, and close to that run
    ref_err = (ref - exact).abs().max().item()
    assert (out - exact).abs().max().item() <= 1.5 * ref_err
    assert (out - ref).abs().max().item() <= 0.02 * exact.abs().max().item()


@torch.no_grad()
def test_autocast_logits_close_to_transformers(hf_reference):
    config, folder, hf = hf_reference
    skip_emulated_bf16(config)
    ours = phi2.load_model(folder)
    x = _tokens(config)
    exact = hf(x).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, out = hf(x).logits.float(), ours(x).float()
    ref_err = (ref - exact).abs().max().item()
    assert (out - exact).abs().max().item() <= 1.5 * ref_err
    assert (out - ref).abs().max().item() <= 0.02 * exact.abs().max().item()


@pytest.mark.parametrize("n_kv_head", [4, 2])
@torch.no_grad()
def test_kv_cache_prefill_then_decode_equals_full_forward(tiny_cfg, n_kv_head):
    model = phi2.build_model(dataclasses.replace(tiny_cfg, n_kv_head=n_kv_head)).eval()
    x = _tokens(tiny_cfg, B=3, T=20)
    full = model(x)
    caches = [model.new_cache(32) for _ in range(3)]  # one per row
    steps = [model(x[:, :8], caches)]  # prefill
    for t in range(8, 20):  # one token at a time
        steps.append(model(x[:, t:t + 1], caches))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


@torch.no_grad()
def test_kv_cache_chunked_prefill_equals_full_forward(tiny_cfg):
    model = phi2.build_model(tiny_cfg).eval()
    x = _tokens(tiny_cfg, B=2, T=24)
    full = model(x)
    caches = [model.new_cache(24) for _ in range(2)]
    chunks = [model(x[:, a:b], caches) for a, b in [(0, 10), (10, 17), (17, 24)]]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=0)


@torch.no_grad()
def test_causality(tiny_cfg):
    model = phi2.build_model(tiny_cfg).eval()
    x = _tokens(tiny_cfg, B=1, T=16)
    y = x.clone()
    y[0, 9] = (y[0, 9] + 1) % tiny_cfg.vocab_size
    a, b = model(x), model(y)
    assert torch.equal(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_gradient_checkpointing_gives_same_loss_and_grads(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, resid_pdrop=0.1, embd_pdrop=0.1)  # dropout must replay identically
    x = _tokens(cfg, B=2, T=16)

    def loss_and_grads(checkpointing):
        model = phi2.build_model(cfg).train()
        model.gradient_checkpointing = checkpointing
        torch.manual_seed(7)
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        return loss, {n: p.grad for n, p in model.named_parameters()}

    loss_a, grads_a = loss_and_grads(False)
    loss_b, grads_b = loss_and_grads(True)
    assert torch.equal(loss_a, loss_b)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=0, msg=name)


def test_dropout_only_in_training(tiny_cfg):
    model = phi2.build_model(dataclasses.replace(tiny_cfg, resid_pdrop=0.5, embd_pdrop=0.5))
    x = _tokens(tiny_cfg, B=1, T=8)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.equal(model(x), model(x))


@torch.no_grad()
def test_fp16_attention_does_not_overflow(tiny_cfg):
    """Scores q.k beyond fp16's 65504 must not overflow: softmax and q.k accumulate in fp32."""
    attn = Attention(tiny_cfg)
    x = torch.randn(1, 12, tiny_cfg.n_embd)
    for lin in (attn.q_proj, attn.k_proj):
        lin.weight.normal_(0, 20.0)
    model = phi2.build_model(tiny_cfg)
    cos, sin = model.rope_cos[:12][None, None], model.rope_sin[:12][None, None]
    q = attn.q_proj(x).view(1, 12, 4, 16).transpose(1, 2).half()
    k = attn.k_proj(x).view(1, 12, 4, 16).transpose(1, 2).half()
    assert not torch.isfinite(q @ k.transpose(-1, -2)).all(), "test inputs should overflow naive fp16 q.k"
    ref = attn(x, cos, sin)
    out = attn.half()(x.half(), cos.half(), sin.half()).float()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=0.05 * ref.abs().max().item(), rtol=0)


def test_sequence_longer_than_context_is_refused(tiny_cfg):
    model = phi2.build_model(tiny_cfg)
    with pytest.raises(ValueError, match="exceeds the context of 64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds the context of 64"):
        model.new_cache(65)
    with pytest.raises(ValueError, match="do not fit a KV cache of 4"):
        model(torch.zeros(1, 5, dtype=torch.long), [model.new_cache(4)])


@pytest.mark.parametrize("autocast", [False, True])
def test_linear_cross_entropy_matches_the_plain_loss_and_its_gradients(autocast):
    from phi2.fused import linear_cross_entropy
    from support import hardware
    N, C, V = 130, 160, 70_000  # several chunks of rows (59 each), of softmax rows and of the weight gradient's rows
    if autocast and not hardware.cpu_bf16_native():
        C = 32  # emulated bf16 matmuls (AVX2 only) are ~60x slower: the same chunks at a fifth of the work
    h0 = torch.randn(N, C)
    W0, b0 = torch.randn(V, C) * 0.1, torch.randn(V) * 0.1
    t = torch.randint(0, V, (N,))

    def run(fn):
        h, W, b = (x.clone().requires_grad_() for x in (h0, W0, b0))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = fn(h, W, b)
        loss.backward()
        return loss, h.grad, W.grad, b.grad

    ours = run(lambda h, W, b: linear_cross_entropy(h, W, b, t))
    ref = run(lambda h, W, b: F.cross_entropy(F.linear(h, W, b).float(), t, reduction="sum"))
    tol = 2e-2 if autocast else 1e-4  # bf16 matmuls: rounding at different places
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, atol=tol * r.abs().max().item(), rtol=0)


@pytest.mark.parametrize("autocast", [False, True])
def test_linear_cross_entropy_with_a_low_rank_update_matches_the_materialised_weight(autocast):
    from phi2.fused import linear_cross_entropy
    N, C, V, r, s = 130, 32, 70_000, 4, 2.0  # 3 chunks of 59 rows
    h0, t = torch.randn(N, C), torch.randint(0, V, (N,))
    W0, b0 = torch.randn(V, C) * 0.1, torch.randn(V) * 0.1
    A0, B0 = torch.randn(r, C) * 0.1, torch.randn(V, r) * 0.1

    def run(fn, frozen_head):
        h, W, b, A, B = (x.clone().requires_grad_() for x in (h0, W0, b0, A0, B0))
        W.requires_grad_(not frozen_head)
        b.requires_grad_(not frozen_head)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = fn(h, W, b, A, B)
        loss.backward()
        return [loss] + [x.grad for x in (h, W, b, A, B) if x.requires_grad]

    for frozen_head in (True, False):
        ours = run(lambda h, W, b, A, B: linear_cross_entropy(h, W, b, t, (A, B, s)), frozen_head)
        ref = run(lambda h, W, b, A, B: F.cross_entropy(F.linear(h, W + s * B @ A, b).float(), t, reduction="sum"),
                  frozen_head)
        tol = 2e-2 if autocast else 1e-4
        assert len(ours) == len(ref) == (4 if frozen_head else 6)
        for a, r_ in zip(ours, ref):
            torch.testing.assert_close(a, r_, atol=tol * r_.abs().max().item(), rtol=0)


def test_linear_cross_entropy_does_no_gradient_work_under_no_grad():
    from phi2.fused import linear_cross_entropy

    h, W, b = torch.randn(50, 16), torch.randn(1000, 16, requires_grad=True), torch.zeros(1000, requires_grad=True)
    t = torch.randint(0, 1000, (50,))
    counts = []
    for weight, bias in ((W, b), (W.detach(), b.detach())):  # trainable head under no_grad; a frozen one
        with torch.no_grad(), Ops() as ops:
            loss = linear_cross_entropy(h, weight, bias, t)
        counts.append((len(ops.names), loss.item()))
    assert counts[0] == counts[1]


@pytest.mark.parametrize("dtype, rows", [(torch.float32, r) for r in (1, 2, 8, 64, 256, 257)]
                         + [(torch.bfloat16, r) for r in (1, 2, 8, 9)])
def test_linear_few_row_paths_match_f_linear_values_and_gradients(dtype, rows):
    from phi2.fused import FastLinear

    class WeightLeft(TorchDispatchMode):  # whether a matmul took the weight as its left operand, W @ x.T
        seen = False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.addmm.default, torch.ops.aten.addmv.default):
                self.seen |= args[1].data_ptr() == layer.weight.data_ptr()
            return func(*args, **(kwargs or {}))

    torch.manual_seed(rows)
    for out_features, in_features in ((1024, 1024), (64, 32)):  # a weight large enough for fp32's path; a small one
        layer = FastLinear(in_features, out_features).to(dtype)
        x = torch.randn(1, rows, in_features, dtype=dtype, requires_grad=True)
        with WeightLeft() as mode:
            y = layer(x)
        if dtype == torch.float32:
            assert mode.seen == (2 <= rows <= 256 and out_features * in_features >= 1 << 20)
        else:
            assert mode.seen == (rows <= 8)
        ref_x, ref_w, ref_b = (t.detach().double().requires_grad_() for t in (x, layer.weight, layer.bias))
        ref = F.linear(ref_x, ref_w, ref_b)
        g = torch.randn_like(y)
        y.backward(g)
        ref.backward(g.double())
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert y.shape == ref.shape == (1, rows, out_features) and y.is_contiguous()  # the next layer's fast layout
        with pytest.raises(RuntimeError):  # a wrong width is an error, as in F.linear, not a reshaped product
            layer(torch.randn(rows, 2 * in_features, dtype=dtype))
        for ours, theirs in ((y, ref), (x.grad, ref_x.grad), (layer.weight.grad, ref_w.grad),
                             (layer.bias.grad, ref_b.grad)):
            assert torch.allclose(ours.double(), theirs, rtol=tol, atol=tol * theirs.abs().max().item())


@pytest.mark.parametrize("rows", [1, 2, 12, 300])
def test_linear_without_gradients_takes_onednn_for_a_large_fp32_weight_and_matches_f_linear(rows):
    """Decoding's fp32 path (no gradients, no autocast, a weight of a million elements or more, an x86 CPU):
    oneDNN's inner product, with F.linear's values; with gradients or under autocast it is not taken."""
    from phi2.fused import ONEDNN_FP32, FastLinear

    torch.manual_seed(rows)
    layer = FastLinear(1024, 1536)
    x = torch.randn(1024, rows).t()[None]  # (1, rows, 1024), not contiguous: as a decode step's rows may come
    for grad, autocast, expected in ((False, False, ONEDNN_FP32), (True, False, False), (False, True, False)):
        with torch.set_grad_enabled(grad), torch.autocast("cpu", torch.bfloat16, enabled=autocast), Ops() as ops:
            y = layer(x)
        assert ("mkldnn::_linear_pointwise" in ops.names) == expected, (grad, autocast, set(ops.names))
        if not autocast:
            ref = F.linear(x.double(), layer.weight.double(), layer.bias.double())
            assert y.shape == ref.shape == (1, rows, 1536) and y.dtype == torch.float32 and y.is_contiguous()
            torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_compiled_linear_does_not_take_onednn():
    """inductor lowers oneDNN's fp32 linear only for weights frozen into the graph; torch.compile'd decoding
    (generate.py --compile) must keep the plain matmul. The graph dynamo hands its backend is read here."""
    from phi2.fused import FastLinear

    targets = []

    def backend(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes)
        return gm.forward

    torch._dynamo.reset()
    layer = FastLinear(1024, 1536)
    x = torch.randn(2, 1024)
    with torch.inference_mode():
        y = torch.compile(layer, backend=backend)(x)
        torch.testing.assert_close(y, layer(x), rtol=1e-5, atol=1e-5)
    assert targets and not any("_linear_pointwise" in t for t in targets), targets


def test_model_loss_equals_cross_entropy_on_labelled_positions(tiny_cfg):
    model = phi2.build_model(tiny_cfg).eval()
    x = _tokens(tiny_cfg, B=2, T=12)
    labels = x.clone()
    labels[:, :5] = -100  # a masked prompt
    labels[1, 9:] = -100  # and padding
    loss, n = model.loss(x, labels)
    logits = model(x)[:, :-1]
    ref = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")
    assert n == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1e-6)


def test_dropout_is_an_unbiased_iid_mask():
    from phi2.fused import dropout
    torch.manual_seed(0)
    x = torch.ones(2_000_000)
    for p in (0.05, 0.1, 0.125, 0.5):  # dropped indices kept up to 1/8, a bool mask above
        y = dropout(x, p)
        dropped = (y == 0).double()
        sd = (p * (1 - p) / x.numel()) ** 0.5
        assert abs(dropped.mean().item() - p) < 5 * sd, p
        pairs = (dropped[:-1] * dropped[1:]).mean().item()  # neighbours are independent
        assert abs(pairs - p * p) < 5 * (p * p * (1 - p * p) / x.numel()) ** 0.5, p
        assert torch.all((y == 0) | (y == 1 / (1 - p)))
        gaps = torch.diff(dropped.nonzero().flatten())  # geometric(p): P(gap = k) = p (1 - p)^(k - 1)
        for k in (1, 2, 3, 10, 30):
            q = p * (1 - p) ** (k - 1)
            share = (gaps == k).double().mean().item()
            assert abs(share - q) < 5 * (q * (1 - q) / len(gaps)) ** 0.5, (p, k)
    assert dropout(x, 0.3, training=False) is x and dropout(x, 0.0) is x
    assert not dropout(x, 1.0).any()
    for p in (0.1, 0.5):  # both kinds of mask, on a transposed input
        z = torch.randn(30, 50).t().requires_grad_()
        y = dropout(z, p)
        y.sum().backward()
        assert torch.equal(z.grad, (y != 0).float() * (1 / (1 - p)))
    with pytest.raises(ValueError, match="dropout probability -0.1"):
        dropout(x, -0.1)


def test_dropped_indices_when_the_first_draw_falls_short(monkeypatch):
    """The gaps drawn a few at a time give the same drops as in one draw: the loop carries on from the last."""
    from phi2.fused import dropped_indices
    torch.manual_seed(0)
    whole = dropped_indices(1000, 0.1)
    rand = torch.rand
    monkeypatch.setattr(torch, "rand", lambda k, **kwargs: rand(min(k, 3), **kwargs))
    torch.manual_seed(0)
    pieces = dropped_indices(1000, 0.1)
    assert torch.equal(pieces, whole) and pieces.dtype == torch.int64
    assert 60 < len(whole) < 140 and bool((torch.diff(whole) > 0).all()) and 0 <= whole[0] and whole[-1] < 1000


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dropout_scales_kept_elements_once(dtype):
    """A kept element and its gradient are x * (1 / (1 - p)) rounded once to x's dtype, to the bit (in fp32
    what F.dropout gives); a dropped one is 0 with gradient 0."""
    from phi2.fused import dropout
    torch.manual_seed(0)
    x = (torch.randn(4, 95, 128) * 3).to(dtype)
    x = torch.where(x == 0, 1.0, x).requires_grad_()  # no exact zeros: a kept element is then never 0
    for p in (0.05, 0.3):  # dropped indices kept, a bool mask kept
        y = dropout(x, p)
        kept = y != 0
        assert 1 - 2 * p < kept.float().mean() < 1 - p / 2
        scaled = x.detach() * (1 / (1 - p))
        assert y.dtype == dtype and torch.equal(y[kept], scaled[kept]) and not y[~kept].any()
        g = torch.randn_like(y)
        x.grad = None
        y.backward(g)
        assert torch.equal(x.grad[kept], (g * (1 / (1 - p)))[kept]) and not x.grad[~kept].any()
        if dtype == torch.float32:
            reference = F.dropout(x.detach(), p)
            both = kept & (reference != 0)
            assert torch.equal(y[both], reference[both])
