"""The serving engine: continuous batching of rewrite requests on one decoding thread. Torch only: the HTTP
side (serving/api.py) talks to it through submit(), Request.cancel() and waiting().

Each step, as nano-vllm's LLMEngine.step reads: admit waiting requests while there is a free row and KV
memory for them (oldest first), prefill the ones admitted (each alone, the template's start copied from a
prefix computed once), pick every row's next token with its own head and sampling, append it (text released
as it becomes final, stop strings and length checked), retire the rows that finished or whose client left,
and run one decoding step for the rest. The rows are a phi2.generation.Batch, so a request's tokens are
exactly what it gets alone, whatever else is running.
"""

import collections
import random
import sys
import threading
import time
import traceback

import torch

from phi2.generation import Batch, next_text, sample
from prompts import format_prompt

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}  # ours -> OpenAI's finish_reason


class Request:
    """One choice to decode: the template's ids, the target whose head rewrites it ("base": none), sampling and
    stop settings. The decoding thread reports through on_event(kind, ...): ("text", piece) as the reply
    grows, then ("done", finish_reason, completion tokens), or ("error", message)."""

    def __init__(self, ids, target, max_tokens, temperature=0.0, top_p=None, seed=None, stop=(), on_event=None):
        self.ids, self.target, self.max_tokens = ids, target, max_tokens
        self.temperature, self.top_p, self.stop = temperature, top_p, list(stop)
        self.seed = random.randrange(2**63) if seed is None else seed
        self.on_event = on_event or (lambda *event: None)
        self.cancelled = threading.Event()  # the client went away: the row stops at the next step
        self.out, self.sent, self.finish = [], "", None
        self.generator = None  # its sampling's own random stream, made when it is admitted

    @property
    def slots(self) -> int:
        """KV cache slots the request needs: its prompt and its longest reply."""
        return len(self.ids) + self.max_tokens

    def cancel(self):
        self.cancelled.set()

    def going(self) -> bool:
        return self.finish is None and not self.cancelled.is_set()

    def fail(self, message: str):
        if self.finish is None:
            self.finish = "error"
            self.on_event("error", message)


class Prefix:
    """The ids every prompt starts with (the template's, up to the prompt itself) and their keys and values
    at each layer (each (1, H_kv, n, D)): computed once, copied into every prefill."""

    @torch.inference_mode()
    def __init__(self, model, tokenizer):
        a, b = (tokenizer.encode(format_prompt(text)) for text in ("a", "b"))
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        self.ids, self.kv = a[:n], []
        if n:
            cache = model.new_cache(n)
            model.hidden_states(torch.tensor([self.ids], device=model.lm_head.weight.device), [cache])
            self.kv = list(zip(cache.k, cache.v))


def kv_bytes_per_slot(model) -> int:
    """Bytes of keys and values one token takes in a KV cache, over every layer."""
    c = model.config
    return 2 * c.n_layer * c.n_kv_head * c.head_dim * model.lm_head.weight.element_size()


class Engine:
    """The prompter's model and heads ({target: head}, "base": the model's own LM head), and the thread that
    decodes what is submitted: at most max_batch rows at once, and at most kv_slots KV cache slots among
    them (a bound on memory, taken up front)."""

    def __init__(self, model, tokenizer, heads: dict, max_batch=16, kv_slots=None, window=0.005):
        self.model, self.tokenizer, self.heads = model, tokenizer, heads
        self.max_batch, self.window = max_batch, window
        self.context = model.config.block_size
        self.kv_slots = kv_slots or max_batch * self.context
        self.device = model.lm_head.weight.device
        self.prefix = Prefix(model, tokenizer)  # the template's start, prefilled once for every request
        self.queue = collections.deque()  # requests waiting to be admitted, oldest first
        self.arrived = threading.Condition()
        self.rows: list[Request] = []  # the running requests, in the batch's row order
        self.batch = Batch(model, [h for h in heads.values() if h is not None])  # the running rows
        self.closed = False
        self.thread = threading.Thread(target=self._loop, daemon=True, name="decoder")
        self.thread.start()

    # ------------------------------------------------------------------------ what the API side calls

    def submit(self, requests: list[Request]):
        with self.arrived:
            self.queue.extend(requests)
            self.arrived.notify()

    def waiting(self) -> int:
        """Requests waiting to be admitted whose clients are still there."""
        return sum(1 for r in list(self.queue) if not r.cancelled.is_set())

    def close(self, timeout=5.0):
        """Stop decoding after the current step and wait for the thread (the server's end: a process that exits
        while the thread is inside a torch call can abort)."""
        with self.arrived:
            self.closed = True
            self.arrived.notify()
        self.thread.join(timeout)

    # ---------------------------------------------------------------------------- the decoding thread

    def _loop(self):
        while True:
            with self.arrived:
                self.arrived.wait_for(lambda: self.queue or self.closed)
            if self.closed:
                return
            time.sleep(self.window)  # requests sent together arrive within a few ms: admitted in one step
            try:
                self.run()
            except Exception as e:  # a bug or an out-of-memory: logged, its rows failed, the server goes on
                print(f"serve.py: the decoder failed: {type(e).__name__}: {e}", file=sys.stderr)
                traceback.print_exc(file=sys.stderr)
                for request in self.rows:
                    request.fail(f"internal error ({type(e).__name__})")
                self.rows, self.batch = [], Batch(self.model, self.batch.heads)

    @torch.inference_mode()
    def run(self):
        """Step until no request is running or waiting, or the engine is closed."""
        while not self.closed and self.step():
            pass

    def step(self) -> bool:
        """One engine step: admit, prefill the admitted, pick and append every row's next token, retire the
        finished, and decode one token for the rest. Whether anything is left to do."""
        for request in self.admit():
            self.prefill(request)
        if not self.rows:
            return bool(self.queue)
        tokens = self.pick()
        for request, token in zip(self.rows, tokens.tolist()):
            if request.going():
                self.append(request, token)
        going = self.retire()
        if going:
            self.decode(tokens[going])
        return True

    def admit(self) -> list[Request]:
        """The waiting requests that join now, oldest first: while a row is free and their KV slots fit. The
        first that does not fit waits for rows to finish, and those behind it wait too, so that none waits
        forever. Requests whose clients left are dropped."""
        admitted, used = [], sum(r.slots for r in self.rows)
        with self.arrived:  # submit() appends under this lock
            while self.queue and len(self.rows) + len(admitted) < self.max_batch:
                request = self.queue[0]
                if request.cancelled.is_set():
                    self.queue.popleft()
                elif used + request.slots <= self.kv_slots:
                    admitted.append(self.queue.popleft())
                    used += request.slots
                else:
                    break
            if any(r.cancelled.is_set() for r in self.queue):  # they stop counting against --max-queue
                live = [r for r in self.queue if not r.cancelled.is_set()]
                self.queue.clear()
                self.queue.extend(live)
        return admitted

    def prefill(self, request: Request):
        """The request's prompt into a cache of its own; a failure (out of memory) fails it alone."""
        try:
            cache, h = self.batch.prefill(request.ids, request.slots, self.prefix)
        except Exception as e:  # noqa: BLE001 (said to its client; the running rows go on)
            print(f"serve.py: a prefill failed: {type(e).__name__}: {e}", file=sys.stderr)
            request.fail(f"{type(e).__name__}: {e}")
            return
        request.generator = torch.Generator(device=self.device).manual_seed(request.seed)
        self.batch.join(cache, h)
        self.rows.append(request)

    def pick(self):
        """Each row's next token (B,): its head's logits, then greedy or its own sampling."""
        by_head = {}
        for r, request in enumerate(self.rows):
            by_head.setdefault(request.target, []).append(r)
        logits = None
        for target, rows in by_head.items():
            part = self.batch.logits(self.heads[target] or self.model.lm_head, None if len(by_head) == 1 else rows)
            if len(by_head) == 1:
                logits = part
                break
            if logits is None:
                logits = part.new_empty(len(self.rows), part.size(1))
            logits[torch.tensor(rows, device=part.device)] = part
        token = sample(logits)  # greedy for every row; sampled rows are redrawn below
        for r, request in enumerate(self.rows):
            if request.temperature > 0:
                token[r] = sample(logits[r:r + 1], request.temperature, None, request.top_p, request.generator)[0]
        return token

    def append(self, request: Request, token: int):
        """Take token as the request's next: release what of its text is final, or finish it."""
        text, request.finish = next_text(request.out, token, self.tokenizer.eos_id, self.tokenizer, request.stop,
                                         request.max_tokens)
        # the reply is the stripped text: leading spaces are never sent, trailing ones wait for what follows
        # (and are dropped at the end), so the pieces sent always join to a prefix of the final reply
        final = text.strip()
        if len(final) > len(request.sent):
            request.on_event("text", final[len(request.sent):])
            request.sent = final
        if request.finish:
            request.on_event("done", FINISH[request.finish], len(request.out) + (request.finish == "eos"))

    def retire(self) -> list[int]:
        """Drop the rows that finished or whose client left; the rows that go on."""
        going = [r for r, request in enumerate(self.rows) if request.going()]
        if len(going) < len(self.rows):
            self.rows = [self.rows[r] for r in going]
            self.batch.retain(going)
        return going

    def decode(self, tokens):
        """One decoding step: every running row's token (B,) through the model."""
        self.batch.step(tokens)
