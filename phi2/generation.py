"""Decoding: each prompt prefilled into a KV cache of its own, then one token per row per step.

`Batch` is the one batched decoding core, used by `generate()` here and by the server's engine
(serving/engine.py), where rows join and leave between steps. Every row computes exactly what it would
alone, bit for bit, in every precision:
- its prefill runs alone, and its attention covers its own keys only (model.KVCache), never padding;
- a decoding step's rows go through each matmul padded to a row count at which the matmul computes a row
  the same as at any other such count (`invariant_rows`): BLAS libraries pick other kernels, which sum in
  another order, for a few rows than for many, and which counts are safe is measured, not assumed;
- sampling draws from each row's own generator.
So a prompt's rewrite never depends on which other prompts shared its batch. Greedy, temperature, top-k and
top-p sampling; stop at EOS or at stop strings (never part of the output, not even while streaming). Layout
after gpt-fast's generate.py (sample / prefill / decode step); torch.compile is applied from outside, by
passing `compiled()` as generate()'s decode step. Left out on purpose: beam search, repetition penalties,
speculative decoding.
"""

import time
from dataclasses import dataclass

import torch

from .model import KVCache, Phi2

ROWS = (*range(1, 17), 24, 32, 48, 64)  # the row counts a decoding step may run at; more rows go in groups
STATIC_BUCKET = 128  # static caches (for torch.compile) round their length up to a multiple of this


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
        drop[:, 0] = False  # the most likely token stays even at top_p 0 (there the only one kept)
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    # a draw from probs as argmax(p / E) with E ~ Exp(1): torch.multinomial checks its input on the host,
    # a wait for the device at every step of a sampled decode on a GPU
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / noise).argmax(dim=-1)  # (B,)


# ------------------------------------------------------------------------------------- row invariance

_invariant = {}  # (module class, parameter shapes, dtype, device, threads, ...) -> its safe row counts


@torch.inference_mode()
def invariant_rows(module: torch.nn.Module, width: int) -> tuple[int, ...]:
    """The counts n in ROWS at which module, mapping (n, width) to (n, out), computes every row exactly as it
    does at 64 rows. Measured once per kind of layer (its class, its parameters' names and shapes, and a LoRA
    layer's merged state), dtype, device, thread count and oneDNN switch, on seeded random rows: a kernel's
    choice depends on the shapes, never on the values."""
    p = next(module.parameters())
    key = (type(module), tuple((n, tuple(q.shape)) for n, q in module.named_parameters()), p.dtype, p.device,
           torch.get_num_threads(), torch.backends.mkldnn.enabled, getattr(module, "merged", None))
    if key not in _invariant:
        x = torch.randn(ROWS[-1], width, generator=torch.Generator().manual_seed(0)).to(p.device, p.dtype)
        reference = module(x)
        _invariant[key] = tuple(n for n in ROWS if torch.equal(module(x[:n]), reference[:n]))
    return _invariant[key]


def safe_rows(model: Phi2, heads=()) -> tuple[int, ...]:
    """The row counts at which every matmul of the model's body and of each head is row-invariant."""
    C = model.config.n_embd
    layer = model.layers[0]
    found = set(ROWS)
    for module, width in [(layer.self_attn.q_proj, C), (layer.self_attn.k_proj, C), (layer.self_attn.v_proj, C),
                          (layer.self_attn.dense, C),
                          (layer.mlp.fc1, C), (layer.mlp.fc2, model.config.intermediate_size),
                          *((head, C) for head in (model.lm_head, *heads) if head is not None)]:
        found &= set(invariant_rows(module, width))
    return tuple(sorted(found)) or (ROWS[-1],)


def padded(n: int, counts: tuple[int, ...]) -> int:
    """The smallest safe row count of at least n (n at most ROWS[-1])."""
    return next(c for c in counts if c >= n)


# --------------------------------------------------------------------------------- the decoding core


def decode_step(model: Phi2, tokens, caches):
    """One token per row (B,) through the model, each into its cache: the rows' next hidden states (B, C).
    (A cache of None is a padding row.) generate() takes a compiled version of this, see compiled()."""
    return model.hidden_states(tokens[:, None], caches)[:, -1]


class Batch:
    """The rows decoding together: each row a KV cache of its own and its last hidden state, from which its
    next token comes. Rows join (prefilled alone, after copying in a prefix's keys and values if given) and
    leave between steps; step() feeds every row one token, padded to a row-invariant count."""

    def __init__(self, model: Phi2, heads=(), decode=decode_step):
        self.model, self.heads, self.decode = model, list(heads), decode
        self.device = model.lm_head.weight.device
        self.counts = safe_rows(model, self.heads)
        self.caches: list[KVCache] = []
        self.h = None  # (B, C)

    def __len__(self):
        return len(self.caches)

    @torch.inference_mode()  # the grad mode the safe row counts were measured in
    def prefill(self, ids: list[int], max_len: int, prefix=None, static=False):
        """A cache of max_len slots holding the prompt `ids`, and the prompt's last hidden state (1, C): the
        prompt run alone, so that its numbers never depend on other rows. prefix: (ids, keys and values at each
        layer) that the prompt may start with, copied in rather than computed again."""
        cache = self.model.new_cache(max_len, static)
        n = 0
        if prefix is not None and len(prefix.ids) < len(ids) and ids[:len(prefix.ids)] == prefix.ids:
            n = len(prefix.ids)
            for layer, (k, v) in enumerate(prefix.kv):
                cache.k[layer][:, :, :n] = k
                cache.v[layer][:, :, :n] = v
            cache.advance(n)
        idx = torch.tensor([ids[n:]], dtype=torch.long, device=self.device)
        return cache, self.model.hidden_states(idx, [cache])[:, -1]

    def join(self, cache: KVCache, h):
        """Add a prefilled row (see prefill) as the last row."""
        self.caches.append(cache)
        self.h = h if self.h is None else torch.cat([self.h, h])

    def retain(self, rows: list[int]):
        """Only these rows go on (the others finished, or their clients left)."""
        if len(rows) < len(self.caches):
            self.caches = [self.caches[r] for r in rows]
            self.h = self.h[torch.tensor(rows, dtype=torch.long, device=self.device)] if rows else None

    @torch.inference_mode()  # the grad mode the safe row counts were measured in
    def step(self, tokens):
        """Feed each row its next token (B,): the rows' new hidden states, in groups of at most ROWS[-1] rows,
        each padded to a row-invariant count."""
        hs = []
        for start in range(0, len(self.caches), ROWS[-1]):
            caches = self.caches[start:start + ROWS[-1]]
            n = padded(len(caches), self.counts)
            group = torch.zeros(n, dtype=torch.long, device=self.device)
            group[:len(caches)] = tokens[start:start + len(caches)]
            hs.append(self.decode(self.model, group, caches + [None] * (n - len(caches)))[:len(caches)])
        self.h = torch.cat(hs)
        return self.h

    @torch.inference_mode()  # the grad mode the safe row counts were measured in
    def logits(self, head, rows=None):
        """head's logits (n, V) for the hidden states of these rows (all by default), padded to a row-invariant
        count as the body's were. head: a module mapping hidden states to logits (the LM head, or a target's)."""
        h = self.h if rows is None else self.h[torch.as_tensor(rows, dtype=torch.long, device=self.device)]
        out = []
        for start in range(0, h.size(0), ROWS[-1]):
            part = h[start:start + ROWS[-1]]
            n = padded(part.size(0), self.counts)
            out.append(head(torch.cat([part, part.new_zeros(n - part.size(0), part.size(1))]))[:part.size(0)])
        return torch.cat(out)


# ------------------------------------------------------------------------------------ text and stops


def _partial_stop(text: str, stop: str) -> int:
    """The length of the longest end of text that is a beginning of stop (shorter than stop): only the last
    len(stop) - 1 characters can be one, and each start there is tried once."""
    window = text[len(text) - min(len(text), len(stop) - 1):]
    i = window.find(stop[0])
    while i >= 0:
        if stop.startswith(window[i:]):
            return len(window) - i
        i = window.find(stop[0], i + 1)
    return 0


def _releasable(text, stop_strings):
    """(text up to any stop string, whether one was found), holding back an incomplete UTF-8 character at
    the end, and then a possible beginning of a stop string before it."""
    cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=-1)
    if cut >= 0:
        return text[:cut], True
    end = len(text)
    while end > 0 and text[end - 1] == "\ufffd":  # a multi-byte character whose last bytes are to come
        end -= 1
    end -= max((_partial_stop(text[:end], s) for s in stop_strings), default=0)
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


# ----------------------------------------------------------------------------------------- generate


def compiled(backend="inductor"):
    """decode_step compiled by torch.compile over static caches (one graph per row count and cache length,
    the first call of each compiling it); the same tokens as eager up to rounding. compiled.stats counts
    what compiling cost: the time of each graph's first call."""
    step = torch.compile(decode_step, backend=backend, dynamic=False)
    seen, stats = set(), {"seconds": 0.0, "graphs": 0}

    def run(model, tokens, caches):
        shape = (len(caches), caches[0].max_len)
        t = None if shape in seen else time.perf_counter()
        h = step(model, tokens, caches)
        if t is not None:
            seen.add(shape)
            stats["seconds"] += time.perf_counter() - t
            stats["graphs"] += 1
        return h

    run.stats = stats
    return run


class _Row:
    """One prompt's state: its seed's generator, generated ids, the text released so far, and how it ended."""

    def __init__(self, generator):
        self.generator, self.ids, self.text, self.released, self.finish = generator, [], "", 0, None


@torch.inference_mode()
def generate(model: Phi2, prompts, max_new_tokens=128, *, temperature=0.0, top_k=None, top_p=None,
             seed=None, eos_id=None, tokenizer=None, stop_strings=(), callback=None, head=None,
             decode=None) -> list[Completion]:
    """Continue each prompt (a list of token ids) by up to max_new_tokens tokens; each row gives exactly what
    its prompt gives alone.

    seed: an int (prompt i samples with seed + i) or one seed per prompt. Rows stop at eos_id or at any of
    stop_strings (which need a tokenizer). callback(row, text) receives each row's text as it becomes final,
    in pieces. head: a module mapping hidden states to logits (a stage-2 head adapter) for this call, instead
    of the model's. decode: the decode step, e.g. compiled(); other than the eager one it gets static caches
    and every row stays in the batch to the end, as torch.compile wants fixed shapes.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if (stop_strings or callback) and tokenizer is None:
        raise ValueError("stop strings and streaming need a tokenizer to decode with")
    context = model.config.block_size
    T = max(len(p) for p in prompts)
    if T >= context:
        raise ValueError(f"a prompt of {T} tokens leaves no room to generate in the context of {context}")
    max_new_tokens = min(max_new_tokens, context - T)
    device = model.lm_head.weight.device
    seeds = [None] * len(prompts) if seed is None else [seed + i for i in range(len(prompts))] \
        if isinstance(seed, int) else list(seed)
    rows = [_Row(None if s is None else torch.Generator(device=device).manual_seed(s)) for s in seeds]
    static = decode is not None
    batch = Batch(model, [head], decode or decode_step)
    for prompt in prompts:  # a row's cache holds its prompt and its new tokens
        length = len(prompt) + max_new_tokens
        if static:  # one length for every row, rounded up: other prompt lengths reuse the compiled graph
            length = min(context, -(-(T + max_new_tokens) // STATIC_BUCKET) * STATIC_BUCKET)
        batch.join(*batch.prefill(prompt, length, static=static))
    head = model.lm_head if head is None else head
    live = list(range(len(rows)))  # the rows still in the batch, by index into rows
    for _ in range(max_new_tokens):
        tokens = _draw(batch.logits(head), [rows[r] for r in live], temperature, top_k, top_p)  # (B,)
        for r, token in zip(live, tokens.tolist()):
            row = rows[r]
            if row.finish:
                continue  # a finished row riding along in a static batch: its tokens are dropped
            if tokenizer is not None:
                row.text, row.finish = next_text(row.ids, token, eos_id, tokenizer, stop_strings, max_new_tokens)
            elif token == eos_id:
                row.finish = "eos"
            else:
                row.ids.append(token)
                row.finish = "length" if len(row.ids) >= max_new_tokens else None
        if callback:
            _stream(rows, callback)
        if not static:
            keep = [k for k, r in enumerate(live) if not rows[r].finish]
            batch.retain(keep)
            live = [live[k] for k in keep]
        if all(row.finish for row in rows):
            break
        batch.step(tokens if static else tokens[keep])
    for row in rows:
        if tokenizer is not None and row.finish != "stop":  # nothing more will come: release any held-back tail
            row.text = tokenizer.decode(row.ids)
    if callback:
        _stream(rows, callback)
    return [Completion(row.ids, row.text if tokenizer else None, row.finish) for row in rows]


def _draw(logits, rows, temperature, top_k, top_p):
    """Each row's next token, sampled from its own generator (greedy at temperature 0)."""
    if temperature < torch.finfo(torch.float32).tiny:
        return sample(logits)
    return torch.cat([sample(logits[k:k + 1], temperature, top_k, top_p, row.generator)
                      for k, row in enumerate(rows)])


def _stream(rows, callback):
    """Hand each row's newly final text to the callback."""
    for i, row in enumerate(rows):
        if len(row.text) > row.released:
            callback(i, row.text[row.released:])
            row.released = len(row.text)
