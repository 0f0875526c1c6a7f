"""Decoding: one prefill through a preallocated KV cache, then one token at a time.

Greedy, temperature, top-k and top-p sampling; stop at EOS or at stop strings (never part of the output,
not even while streaming); batches of prompts of different lengths, left-padded, where each row gives what
that prompt alone would. Layout after gpt-fast's generate.py (sample / prefill / decode_one_token).
Left out on purpose: beam search, repetition penalties, speculative decoding.
"""

import time
from dataclasses import dataclass

import torch

from .model import Phi2
from .tokenizer import pad


@dataclass
class Completion:
    ids: list[int]  # new tokens, without the EOS
    text: str | None  # decoded and cut before any stop string; None without a tokenizer
    finish: str  # "eos", "stop" (a stop string) or "length" (max_new_tokens)


def sample(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """Next token ids (B,) from last-position logits (B, V). temperature 0 means greedy."""
    if temperature < torch.finfo(torch.float32).tiny:  # 0, or a temperature that is 0 in float32
        if logits.is_cpu:  # numpy's argmax is ~20x faster than torch's on CPU for (B, 51200) rows
            return torch.from_numpy(logits.float().numpy().argmax(axis=-1))
        return logits.argmax(dim=-1)
    logits = logits.float()
    # shifted so that the largest is 0 before dividing: a tiny temperature then gives -inf for the others (a
    # greedy draw), never inf - inf = NaN
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        # keep the smallest set holding top_p of the mass: drop a token once those before it reach top_p
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    # a draw from probs as argmax(p / E) with E ~ Exp(1): torch.multinomial checks its input on the host,
    # a wait for the device at every step of a sampled decode on a GPU
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / noise).argmax(dim=-1)  # (B,)


def prefill(model: Phi2, idx, mask=None, position_ids=None, head=None):
    """Run the prompts (B, T) through the model from slot 0; logits of the last position (B, V)."""
    T = idx.size(1)
    h = model.hidden_states(idx, torch.arange(T, device=idx.device), mask, position_ids, kv_len=T)  # (B, T, C)
    head = model.lm_head if head is None else head
    return head(h[:, -1])  # only the last position: skip T-1 rows of the LM head


def decode_one_token(model: Phi2, token, pos: int, mask=None, position_ids=None, head=None):
    """Feed one token per row (B,) at cache slot pos; logits (B, V)."""
    input_pos = torch.arange(pos, pos + 1, device=token.device)  # made on the device: no copy to wait for
    h = model.hidden_states(token[:, None], input_pos, mask, position_ids, kv_len=pos + 1)  # (B, 1, C)
    head = model.lm_head if head is None else head
    return head(h[:, -1])


def decode_static(model: Phi2, token, input_pos, key_ok, slots, position_ids=None, head=None):
    """decode_one_token with every shape fixed, for torch.compile: attention over all S slots of the cache,
    with slots not yet written (or padded) masked; input_pos (1,) is a device tensor, key_ok (B, S) marks
    the slots that hold real tokens, slots is arange(S). Logits (B, V)."""
    mask = (key_ok & (slots <= input_pos))[:, None, None, :]  # (B, 1, 1, S)
    h = model.hidden_states(token[:, None], input_pos, mask, position_ids, kv_len=slots.numel())  # (B, 1, C)
    return (model.lm_head if head is None else head)(h[:, -1])


STATIC_BUCKET = 128  # cache slots are rounded up to a multiple: prompts of other lengths reuse a compiled graph
compile_stats = {"seconds": 0.0, "graphs": 0}  # what compiling cost this process: first calls of each shape
_compiled, _compiled_shapes = {}, set()


def _compiled_decode(backend: str):
    if backend not in _compiled:
        _compiled[backend] = torch.compile(decode_static, backend=backend, dynamic=False)
    return _compiled[backend]


def left_padding(valid):
    """Attention mask (B, 1, T, T) and rotary positions (B, T) for left-padded rows; valid (B, T) is True
    on real tokens. Positions count real tokens only, and a pad query attends to itself so that no
    softmax row is empty (an empty row gives NaN, which would leak through the zero weights)."""
    T = valid.size(1)
    position_ids = (valid.cumsum(dim=-1) - 1).clamp(min=0)  # (B, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(T, dtype=torch.bool, device=valid.device)
    mask = (causal & valid[:, None, :]) | eye  # (B, T, T)
    return mask[:, None], position_ids


class _Row:
    """One row's generated ids and what of its text has been released (streamed or returned)."""

    def __init__(self):
        self.ids, self.text, self.released, self.finish = [], "", 0, None


def _releasable(text, stop_strings):
    """(text up to any stop string, whether one was found), holding back a possible partial stop string
    and an incomplete UTF-8 character at the end."""
    cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=-1)
    if cut >= 0:
        return text[:cut], True
    hold = max((k for s in stop_strings for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    end = len(text) - hold
    while end > 0 and text[end - 1] == "\ufffd":  # a multi-byte character whose last bytes are to come
        end -= 1
    return text[:end], False


def next_text(ids, token, eos_id, tokenizer, stop_strings, max_new_tokens) -> tuple[str, str | None]:
    """Take token as the next of a row's generated ids (appended unless it is eos_id): (the row's text that is
    final so far, and "eos", "stop" or "length" if the row has ended, else None). An ended row's text is
    whole; a growing row's holds back a possible partial stop string and an incomplete character."""
    finish = "eos" if token == eos_id else None
    if finish is None:
        ids.append(token)
    whole = tokenizer.decode(ids)
    text, stopped = _releasable(whole, stop_strings)
    if stopped:
        return text, "stop"
    if finish is None and len(ids) >= max_new_tokens:
        finish = "length"
    return (whole, finish) if finish else (text, None)


@torch.inference_mode()
def generate(model: Phi2, prompts, max_new_tokens=128, *, temperature=0.0, top_k=None, top_p=None,
             seed=None, eos_id=None, tokenizer=None, stop_strings=(), callback=None, head=None,
             compile=False) -> list[Completion]:
    """Continue each prompt (a list of token ids) by up to max_new_tokens tokens.

    Rows stop at eos_id or at any of stop_strings (which need a tokenizer). callback(row, text) receives
    each row's text as it becomes final, in pieces. Rows of different lengths are left-padded: their rotary
    positions start at 0 and padded slots are masked, so a row does not depend on the others. head: a
    module mapping hidden states to logits (a stage-2 head adapter) for this call, instead of the model's.
    compile: True (inductor) or a torch.compile backend name: decode steps run compiled over a static cache
    (the same tokens as eager up to rounding; the first call of each batch size and cache bucket compiles,
    and compile_stats counts what that cost).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if (stop_strings or callback) and tokenizer is None:
        raise ValueError("stop strings and streaming need a tokenizer to decode with")
    device = model.lm_head.weight.device
    B, T = len(prompts), max(len(p) for p in prompts)
    context = model.config.block_size
    if T >= context:
        raise ValueError(f"a prompt of {T} tokens leaves no room to generate in the context of {context}")
    max_new_tokens = min(max_new_tokens, context - T)
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)

    idx, valid = pad(prompts, pad_id=0, padding_side="left")  # (B, T) each
    padded = not bool(valid.all())  # asked on the CPU, before the copy: no wait for the device
    idx, valid = idx.to(device), valid.to(device)
    mask = position_ids = None
    if padded:
        mask, position_ids = left_padding(valid)
        key_valid = torch.cat([valid, valid.new_ones(B, max_new_tokens)], dim=1)  # (B, T + new)

    S = T + max_new_tokens
    if compile:  # a static cache: its length rounded up, so that other prompt lengths reuse the graph
        S = min(context, -(-S // STATIC_BUCKET) * STATIC_BUCKET)
        slots = torch.arange(S, device=device)
        key_ok = torch.cat([valid, valid.new_ones(B, S - T)], dim=1)  # (B, S)
        input_pos = torch.full((1,), T - 1, device=device)
        decode = _compiled_decode("inductor" if compile is True else compile)
    model.setup_kv_cache(B, S, device=device)
    try:
        token = sample(prefill(model, idx, mask, position_ids, head), temperature, top_k, top_p, generator)

        def step(i, token):
            """The next token after `token`, fed at cache slot T + i."""
            nonlocal mask, position_ids
            if padded:
                mask = key_valid[:, None, None, : T + i + 1]  # (B, 1, 1, S)
                position_ids = position_ids[:, -1:] + 1  # (B, 1)
            if compile:
                input_pos.add_(1)  # slot T + i, counted on the device
                shape = (B, S, padded, head is None)
                t = time.perf_counter() if shape not in _compiled_shapes else None
                logits = decode(model, token, input_pos, key_ok, slots, position_ids, head)
                if t is not None:
                    _compiled_shapes.add(shape)
                    compile_stats["seconds"] += time.perf_counter() - t
                    compile_stats["graphs"] += 1
            else:
                logits = decode_one_token(model, token, T + i, mask, position_ids, head)
            return sample(logits, temperature, top_k, top_p, generator)

        if stop_strings or callback:
            rows = _decode_text(step, token, max_new_tokens, eos_id, tokenizer, stop_strings, callback, B)
        else:
            rows = _decode_ids(step, token, max_new_tokens, eos_id, B)
    finally:
        model.clear_kv_cache()
    if tokenizer is not None:
        for row in rows:
            if row.finish != "stop":  # nothing more will come: release any held-back tail
                row.text = tokenizer.decode(row.ids)
        if callback:
            _stream(rows, callback)
    return [Completion(row.ids, row.text if tokenizer else None, row.finish) for row in rows]


def _decode_ids(step, token, max_new_tokens, eos_id, B):
    """Tokens stay on the device, and whether every row has ended is asked every step on the CPU (where
    it costs nothing) and every 16 steps elsewhere (each ask waits for the device)."""
    out = torch.empty(B, max_new_tokens, dtype=torch.long, device=token.device)
    ended = torch.zeros(B, dtype=torch.bool, device=token.device)
    every = 1 if token.is_cpu else 16
    n = max_new_tokens
    for i in range(max_new_tokens):
        out[:, i] = token
        if eos_id is not None:
            ended |= token == eos_id
        if i == max_new_tokens - 1 or ((i + 1) % every == 0 and bool(ended.all())):
            n = i + 1
            break
        token = step(i, token)
    rows = []
    for ids in out[:, :n].tolist():
        row = _Row()
        cut = ids.index(eos_id) if eos_id in ids else None
        row.ids, row.finish = (ids, "length") if cut is None else (ids[:cut], "eos")
        rows.append(row)
    return rows


def _decode_text(step, token, max_new_tokens, eos_id, tokenizer, stop_strings, callback, B):
    """Token by token on the host: stop strings and streaming need each row's text as it grows."""
    rows = [_Row() for _ in range(B)]
    for i in range(max_new_tokens):
        for row, tok in zip(rows, token.tolist()):
            if row.finish:
                continue  # finished rows still ride along in the batch; their tokens are dropped
            row.text, row.finish = next_text(row.ids, tok, eos_id, tokenizer, stop_strings, max_new_tokens)
        if callback:
            _stream(rows, callback)
        if all(row.finish for row in rows):
            break
        token = step(i, token)
    return rows


def _stream(rows, callback):
    """Hand each row's newly final text to the callback."""
    for i, row in enumerate(rows):
        if len(row.text) > row.released:
            callback(i, row.text[row.released:])
            row.released = len(row.text)
