"""serve.py through the official openai client, against servers started on 127.0.0.1 on free ports: the
models, both endpoints, streaming, every error status, auth, dynamic batching (each reply equal to the same
request alone, and to phi2.generation.generate), client disconnect, and the proxy in front of an upstream
server the test runs."""

import collections
import io
import json
import re
import threading
import time
import urllib.parse

import pytest
import torch

from tests.conftest import load_prompter, write_prompter
from tests.servers import LoopbackServer, completion, send_json

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

import head_adapter as ha  # noqa: E402
import serve  # noqa: E402
import serving.engine  # noqa: E402
from phi2.generation import generate  # noqa: E402
from prompts import format_prompt  # noqa: E402
from serving.engine import Engine, Request  # noqa: E402

KEY, UPSTREAM_KEY = "sk-test-server", "sk-upstream-secret"
PROMPTS = ["write a poem about rain", "explain taxes for children", "summarize a report on sorting",
           "draft a plan about café life", "write a function", "explain a poem in detail"]


@pytest.fixture(scope="module")
def prompter(tiny_checkpoint, tmp_path_factory):
    return write_prompter(tiny_checkpoint, tmp_path_factory.mktemp("serve"))


class Recording(Engine):
    """The engine, recording the rows of each decoding step and why each row left, with its token count;
    delay: seconds added to each step, for tests of slow batches."""
    delay = 0.0

    def __init__(self, *args, **kwargs):
        self.steps, self.left = collections.deque(maxlen=10_000), collections.deque(maxlen=10_000)
        self.seen = collections.defaultdict(list)  # request -> each hidden state its next token came from
        super().__init__(*args, **kwargs)

    def pick(self):
        for request, h in zip(self.rows, self.batch.h):
            self.seen[request].append(h.clone())
        return super().pick()

    def decode(self, tokens):
        self.steps.append(len(tokens))
        time.sleep(self.delay)
        super().decode(tokens)

    def retire(self):
        self.left.extend((r.finish or "cancelled", len(r.out)) for r in self.rows if not r.going())
        return super().retire()


def decode(engine: Engine, requests: list[Request]):
    """Decode the requests on this thread, to the end (the engine's own thread is left waiting)."""
    engine.queue.extend(requests)
    engine.run()


def wait_for(condition, seconds: float) -> bool:
    """Poll condition() every 10 ms until it holds or seconds pass; whether it holds (a bounded wait)."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return bool(condition())


def start(app):
    """Run the app on uvicorn in a thread, on a free port; its base URL."""
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    threading.Thread(target=uv.run, daemon=True).start()
    assert wait_for(lambda: uv.started, 5), "the server did not start within 5 s"
    return f"http://127.0.0.1:{uv.servers[0].sockets[0].getsockname()[1]}/v1"


def launch(prompter, monkeypatch, *args, step_delay=0.0):
    """(the API, with a Recording engine, and its base URL)."""
    monkeypatch.setenv("SERVE_KEY", KEY)
    monkeypatch.setattr(serving.engine, "Engine", type("Slow", (Recording,), {"delay": step_delay}))
    cfg = serve.parse_args(["--lora", str(prompter / "lora"), "--head", str(prompter / "alpha.safetensors"),
                            "--head", str(prompter / "beta.safetensors"), "--device", "cpu", "--precision", "fp32",
                            "--api-key-env", "SERVE_KEY", "--max-tokens", "24", *args])
    app = serve.load(cfg)
    return app.state.api, start(app)


@pytest.fixture(scope="module")
def served(prompter):
    with pytest.MonkeyPatch.context() as mp:
        server, url = launch(prompter, mp)
    return server, openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=60)


def direct(prompter, model, prompt, max_tokens):
    """What phi2.generation.generate gives for the prompt with the model's head (greedy), stripped."""
    merged, tokenizer, fp, stage1 = load_prompter(prompter / "lora", torch.float32)
    head = None if model == "base" else ha.load_head(prompter / f"{model}.safetensors", merged, fp, stage1)
    ids = tokenizer.encode(format_prompt(prompt))
    c = generate(merged, [ids], max_tokens, eos_id=tokenizer.eos_id, tokenizer=tokenizer, head=head)[0]
    return c.text.strip(), len(ids)


def chat(client, prompt, model="alpha", **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                          **{"temperature": 0, **kw})


def test_models_and_both_endpoints_give_the_greedy_rewrite(served, prompter):
    server, client = served
    assert sorted(m.id for m in client.models.list().data) == ["alpha", "base", "beta"]
    for model in ("alpha", "beta", "base"):
        expected, prompt_tokens = direct(prompter, model, PROMPTS[0], 24)
        reply = chat(client, PROMPTS[0], model, max_tokens=24)
        assert reply.choices[0].message.content == expected and reply.choices[0].message.role == "assistant"
        assert reply.usage.prompt_tokens == prompt_tokens and 0 < reply.usage.completion_tokens <= 24
        text = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=24, temperature=0)
        assert text.choices[0].text == expected and text.object == "text_completion"
    # the heads give different rewrites of the same prompt: each request got its own head
    assert len({chat(client, PROMPTS[1], m).choices[0].message.content for m in ("alpha", "beta", "base")}) == 3


def test_streaming_equals_the_plain_reply(served):
    _, client = served
    for prompt in PROMPTS[:3]:
        plain = chat(client, prompt, max_tokens=20, stop=["e"])
        chunks = list(chat(client, prompt, max_tokens=20, stop=["e"], stream=True,
                           stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == plain.choices[0].message.content
        finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finals == [plain.choices[0].finish_reason]
        assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
        pieces = list(client.completions.create(model="beta", prompt=prompt, max_tokens=20, temperature=0,
                                                stream=True))
        same = client.completions.create(model="beta", prompt=prompt, max_tokens=20, temperature=0)
        assert "".join(p.choices[0].text for p in pieces) == same.choices[0].text
        assert pieces[-1].choices[0].finish_reason == same.choices[0].finish_reason


def test_concurrent_requests_are_batched_and_each_equals_its_solo_reply(served):
    server, client = served
    requests = [(p, m) for p in PROMPTS for m in ("alpha", "beta", "base")][:16]
    solo = [chat(client, p, m).choices[0].message.content for p, m in requests]
    seeded = chat(client, PROMPTS[2], temperature=1.0, seed=7, n=2, top_p=0.9)
    server.engine.steps.clear()
    results = [None] * len(requests)
    barrier = threading.Barrier(len(requests) + 1)

    def ask(i, p, m):
        barrier.wait()
        results[i] = chat(client, p, m).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i, p, m)) for i, (p, m) in enumerate(requests)]
    for t in threads:
        t.start()
    barrier.wait()
    again = chat(client, PROMPTS[2], temperature=1.0, seed=7, n=2, top_p=0.9)  # sampled, seeded, in the crowd
    for t in threads:
        t.join(timeout=60)
    assert results == solo
    assert max(server.engine.steps) > 1  # they shared steps
    assert [c.message.content for c in again.choices] == [c.message.content for c in seeded.choices]


def test_requests_that_fit_the_context_alone_but_not_padded_together_both_succeed(served):
    server, client = served
    tokenizer, context = server.engine.tokenizer, server.engine.context
    long = "word " * 10
    while len(tokenizer.encode(format_prompt(long + "word"))) < context - 12:
        long += "word "
    size = lambda p: len(tokenizer.encode(format_prompt(p)))  # noqa: E731
    requests = [(long, context - size(long)), ("word", context - size("word"))]  # together: over the context
    solo = [chat(client, p, max_tokens=n).choices[0].message.content for p, n in requests]
    results = [None, None]
    barrier = threading.Barrier(2)

    def ask(i):
        barrier.wait()
        results[i] = chat(client, requests[i][0], max_tokens=requests[i][1]).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == solo


def test_errors_have_openai_shapes_and_statuses(served, prompter):
    server, client = served
    with pytest.raises(openai.BadRequestError, match="'temperature' must be"):
        chat(client, "x", temperature=3)
    with pytest.raises(openai.BadRequestError, match="'n' must be"):
        chat(client, "x", n=0)
    with pytest.raises(openai.BadRequestError, match="not supported"):
        chat(client, "x", logprobs=True)
    with pytest.raises(openai.BadRequestError, match="no user message"):
        client.chat.completions.create(model="alpha", messages=[{"role": "system", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match=r"messages\[0\].role must be one of system, developer, user"):
        client.chat.completions.create(model="alpha", messages=[{"role": "wizard", "content": "hi"},
                                                                {"role": "user", "content": "x"}])
    with pytest.raises(openai.NotFoundError, match="does not exist") as e:
        chat(client, "x", model="gpt-5")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.APIStatusError, match="context") as e:
        chat(client, "word " * 200)
    assert e.value.status_code == 413
    with pytest.raises(openai.BadRequestError, match="exceed the context"):
        chat(client, "x", max_tokens=1000)
    with pytest.raises(openai.AuthenticationError, match="Incorrect API key"):
        openai.OpenAI(base_url=str(client.base_url), api_key="wrong", max_retries=0).models.list()
    raw = httpx.get(f"{client.base_url}models")  # no key at all: said so
    assert raw.status_code == 401 and raw.json()["error"]["message"].startswith("You didn't provide an API key")
    as_json = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    raw = httpx.post(f"{client.base_url}chat/completions", content=b"{not json", headers=as_json)
    assert raw.status_code == 400 and raw.json()["error"]["message"] == "the request body is not valid JSON"
    for junk in (b"[1, 2]", b'{"model": "alpha", "messages": "hi"}', b'{"model": ["a"]}', b"\xff\xfe",
                 b'{"model": "alpha", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}'):
        raw = httpx.post(f"{client.base_url}chat/completions", content=junk, headers=as_json)
        assert raw.status_code == 400 and "error" in raw.json(), junk
    for junk in (b'{"model": "alpha", "prompt": "x", "temperature": NaN}', b'{"model": "alpha", "prompt": "x", "n": 1'
                 + b"9" * 400 + b"}", b'{"model": "alpha", "prompt": "\\ud800 x"}', b"[" * 100_000 + b"]" * 100_000):
        raw = httpx.post(f"{client.base_url}completions", content=junk, headers=as_json)
        assert raw.status_code == 400 and "error" in raw.json(), junk[:60]
    assert httpx.get(f"{client.base_url}nothing", headers={"Authorization": f"Bearer {KEY}"}).status_code == 404
    assert chat(client, PROMPTS[0]).choices  # and it still serves
    # null where OpenAI takes null: not streamed; top_p 0 keeps the most likely token alone, the greedy rewrite
    body = {"model": "alpha", "messages": [{"role": "user", "content": PROMPTS[0]}], "stream": None,
            "temperature": 1.0, "top_p": 0, "seed": 3, "max_tokens": 12}
    raw = httpx.post(f"{client.base_url}chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert raw.status_code == 200, raw.text
    assert raw.json()["choices"][0]["message"]["content"] == chat(client, PROMPTS[0], max_tokens=12).choices[0] \
        .message.content


def test_rows_joining_and_leaving_at_different_steps_each_equal_their_solo_decode(prompter):
    model, tokenizer, fp, stage1 = load_prompter(prompter / "lora", torch.float32)
    heads = {"base": None, "alpha": ha.load_head(prompter / "alpha.safetensors", model, fp, stage1)}
    engine = Recording(model, tokenizer, heads, max_batch=2)
    # (prompt, head, max_tokens, temperature, seed): two rows at a time, so each finish lets the next join
    # at a step of its own, with a prompt shorter or longer than the rows it joins
    specs = [(PROMPTS[5], "alpha", 9, 0.0, None), (PROMPTS[4], "base", 3, 0.0, None),
             (PROMPTS[3] * 3, "alpha", 12, 0.0, None), (PROMPTS[0], "base", 5, 0.9, 11),
             (PROMPTS[1], "alpha", 7, 0.0, None)]
    make = lambda: [Request(tokenizer.encode(format_prompt(p)), m, n, t, None, seed)  # noqa: E731
                    for p, m, n, t, seed in specs]
    seen = lambda jobs: [torch.stack(engine.seen[job]) for job in jobs]  # noqa: E731 (each job's hidden states)
    prefix, engine.prefix = engine.prefix, None  # each prompt prefilled whole
    assert len(prefix.ids) >= 5  # the template's start, "System: Fix the following prompt. Prompt:"
    whole = make()
    for job in whole:
        decode(engine, [job])
    engine.prefix = prefix  # from here on, the template's start is copied from the prefix
    solo = make()
    for job in solo:
        decode(engine, [job])
    engine.steps.clear()
    engine.left.clear()
    jobs = make()
    decode(engine, jobs)
    assert [job.out for job in jobs] == [job.out for job in solo] == [job.out for job in whole]
    assert [len(job.out) for job in solo] == [n for _, _, n, _, _ in specs]  # no EOS: each row runs to its length
    # two rows at a time, each next job taking the row freed first: rows leave in this order, not arrival's
    assert [tokens for _, tokens in engine.left] == [3, 9, 5, 12, 7]
    assert set(engine.steps) == {1, 2}
    # every hidden state a head saw is, bit for bit, the one the same job gave alone (the tokens alone are a
    # weak check: a tiny random model's argmax barely depends on what a row attends to); and the prefix's
    # copied keys and values give what the whole prompt's prefill gives, up to rounding
    for together, alone, full in zip(seen(jobs), seen(solo), seen(whole)):
        assert torch.equal(together, alone)
        torch.testing.assert_close(alone, full, atol=1e-4, rtol=0)


def test_a_prefill_that_fails_fails_only_its_own_job(prompter, monkeypatch):
    model, tokenizer, _, _ = load_prompter(prompter / "lora", torch.float32)
    engine = Engine(model, tokenizer, {"base": None}, max_batch=2)
    events = collections.defaultdict(list)
    make = lambda p, n: Request(tokenizer.encode(format_prompt(p)), "base", n,  # noqa: E731
                                on_event=lambda *e, p=p: events[p].append(e))
    alone = make(PROMPTS[0], 8)
    decode(engine, [alone])
    prefills, hidden_states = [], model.hidden_states

    def failing(idx, *args, **kwargs):  # the third prefill (the third job's) runs out of memory
        if idx.size(1) > 1:
            prefills.append(idx.size(0))
            if len(prefills) == 3:
                raise RuntimeError("out of memory (simulated)")
        return hidden_states(idx, *args, **kwargs)

    monkeypatch.setattr(model, "hidden_states", failing)
    first, short, late = make(PROMPTS[0], 8), make(PROMPTS[1], 2), make(PROMPTS[2], 4)
    decode(engine, [first, short, late])  # first and short start together; late takes short's row, and fails
    assert prefills == [1, 1, 1] and first.out == alone.out and len(short.out) == 2 and late.out == []
    assert events[PROMPTS[2]] == [("error", "RuntimeError: out of memory (simulated)")]


def test_a_waiting_job_whose_client_left_stops_counting_against_the_queue(prompter):
    model, tokenizer, _, _ = load_prompter(prompter / "lora", torch.float32)
    engine = type("Slow", (Recording,), {"delay": 0.02})(model, tokenizer, {"base": None}, max_batch=1)
    make = lambda n: Request(tokenizer.encode(format_prompt(PROMPTS[0])), "base", n)  # noqa: E731
    running, waiting = make(24), make(4)
    engine.submit([running, waiting])
    wait_for(lambda: engine.rows, 3)
    assert len(engine.queue) == 1  # one row at most: the second waits
    waiting.cancelled.set()
    wait_for(lambda: not engine.queue, 1)
    assert not engine.queue and len(engine.rows) == 1  # dropped at the next step, while the first still decodes


def test_a_request_arriving_mid_decode_joins_at_the_next_step_and_equals_its_solo_reply(prompter, monkeypatch):
    server, url = launch(prompter, monkeypatch, step_delay=0.05)
    client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=60)
    engine = server.engine
    first, second = (PROMPTS[5], "alpha", 24), (PROMPTS[0], "beta", 6)  # prompts of different lengths
    solo = [direct(prompter, m, p, n)[0] for p, m, n in (first, second)]
    stream = chat(client, first[0], first[1], max_tokens=first[2], stream=True)
    pieces = [next(iter(stream)).choices[0].delta.content or ""]
    wait_for(lambda: len(engine.steps) >= 3, 3)  # until the first row has made a few tokens
    joined = chat(client, second[0], second[1], max_tokens=second[2]).choices[0].message.content
    pieces += [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert ["".join(pieces), joined] == solo
    wait_for(lambda: len(engine.left) == 2, 2)  # a row's last piece reaches its client before it is retired
    # the second left first, while the first went on: it had joined the running row, not waited for it
    assert [tokens for _, tokens in engine.left] == [second[2], first[2]]
    assert 2 in engine.steps and engine.steps[-1] == 1


def test_a_full_queue_gets_503_and_a_client_that_leaves_frees_its_slot(prompter, monkeypatch):
    server, url = launch(prompter, monkeypatch, "--max-queue", "1", "--max-batch", "1", step_delay=0.08)
    server.log = io.StringIO()
    client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=60)
    engine = server.engine
    stream = chat(client, PROMPTS[0], model="base", max_tokens=40, stream=True)
    next(iter(stream))
    wait_for(lambda: engine.rows, 2)  # until its row decodes (40 steps of 80 ms), alone: --max-batch 1
    assert len(engine.rows) == 1
    waiting = threading.Thread(target=lambda: chat(client, PROMPTS[1], max_tokens=2))
    waiting.start()
    wait_for(lambda: len(engine.queue) == 1, 2)
    assert len(engine.queue) == 1
    with pytest.raises(openai.BadRequestError, match="queues at most 1"):
        chat(client, PROMPTS[2], n=2)  # could never fit: 400, not a 503 to retry forever
    with pytest.raises(openai.InternalServerError, match=r"busy \(1 of at most 1 choices waiting\)") as e:
        chat(client, PROMPTS[2])
    assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "1"
    stream.close()  # the client leaves mid-stream: its row stops, the waiting request runs
    waiting.join(timeout=10)
    assert not waiting.is_alive()
    wait_for(lambda: not engine.rows, 2)
    assert not engine.rows and len(engine.left) == 2 and max(engine.steps) == 1
    why, tokens = engine.left[0]
    assert why == "cancelled" and tokens < 20  # the stream's row stopped when its client left, not after 40
    # the access log tells the stream that was not delivered in full from the replies that were
    assert wait_for(lambda: len(server.log.getvalue().splitlines()) == 4, 2)
    statuses = [json.loads(line)["status"] for line in server.log.getvalue().splitlines()]
    assert sorted(statuses) == [200, 400, 499, 503]


class Upstream(LoopbackServer):
    """An OpenAI-compatible upstream that records what it receives and echoes the key it was sent."""

    def __init__(self):
        self.received = []
        super().__init__(self.respond)
        self.url += "/v1"

    def respond(self, handler, data):
        body = json.loads(data)
        self.received.append((dict(handler.headers), body))
        if body.get("user") == "rate me":
            return send_json(handler, 429, {"error": {"message": "slow down"}}, {"Retry-After": "7"})
        if body.get("user") == "escape":  # the key with a JSON escape: \\u0073k-...
            return send_json(handler, 200, None, raw=b'{"echo": "\\u' + b"%04x" % ord(UPSTREAM_KEY[0])
                             + UPSTREAM_KEY[1:].encode() + b'"}')
        if body.get("user") == "cut":  # promises 1000 bytes, sends 9
            handler.send_response(200)
            handler.send_header("Content-Length", "1000")
            handler.end_headers()
            handler.wfile.write(b'{"choices')
            handler.close_connection = True
            return
        answer = f"upstream answer (key {handler.headers['Authorization'].removeprefix('Bearer ')})"
        if body.get("user") == "tight":  # SSE allows `data:` without a space; the key JSON-escaped in it
            handler.send_response(200)
            handler.send_header("Content-Type", "text/event-stream")
            handler.end_headers()
            escaped = f"\\u{ord(UPSTREAM_KEY[0]):04x}{UPSTREAM_KEY[1:]}"
            handler.wfile.write(b'data:{"choices": [{"index": 0, "delta": {"content": "' + escaped.encode()
                                + b'"}, "finish_reason": null}]}\n\ndata: [DONE]\n\n')
            return
        if not body.get("stream"):
            return send_json(handler, 200, {"id": "u1", "object": "chat.completion", "created": 1,
                                            "model": body["model"], **completion(answer)})
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.end_headers()
        for piece in (answer[:10], answer[10:]):
            chunk = {"id": "u1", "object": "chat.completion.chunk", "created": 1, "model": body["model"],
                     "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
            handler.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        handler.wfile.write(b"data: [DONE]\n\n")


def test_the_proxy_forwards_the_rewrite_and_never_the_key(prompter, monkeypatch, tmp_path):
    upstream = Upstream()
    monkeypatch.setenv("UP_KEY", UPSTREAM_KEY)
    server, url = launch(prompter, monkeypatch, "--upstream", f"alpha={upstream.url}", "--upstream-model",
                         "alpha=big-model", "--upstream-key-env", "alpha=UP_KEY", "--log", str(tmp_path / "log.jsonl"))
    client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=60)
    expected, _ = direct(prompter, "alpha", PROMPTS[0], 24)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPTS[0]}]
    raw = client.chat.completions.with_raw_response.create(model="alpha", messages=messages, temperature=0.3,
                                                           user="u-1", max_tokens=77)
    reply = raw.parse()
    headers, body = upstream.received[-1]
    assert urllib.parse.unquote(raw.headers["x-optimized-prompt"]) == expected
    assert body["messages"] == [messages[0], {"role": "user", "content": expected}]
    assert (body["model"], body["temperature"], body["user"], body["max_tokens"]) == ("big-model", 0.3, "u-1", 77)
    assert headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert reply.choices[0].message.content == "upstream answer (key ***)"
    streamed = list(client.chat.completions.create(model="alpha", messages=messages, stream=True))
    assert "".join(c.choices[0].delta.content for c in streamed) == "upstream answer (key ***)"
    parts = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]
    raw = client.chat.completions.with_raw_response.create(model="alpha", messages=parts)  # nothing to rewrite
    assert upstream.received[-1][1]["messages"] == parts and "x-optimized-prompt" not in raw.headers
    with pytest.raises(openai.RateLimitError) as e:  # upstream errors keep their status and headers
        client.chat.completions.create(model="alpha", messages=messages, user="rate me")
    assert e.value.response.headers["retry-after"] == "7"
    escaped = httpx.post(f"{url}/chat/completions", json={"model": "alpha", "messages": messages, "user": "escape"},
                         headers={"Authorization": f"Bearer {KEY}"})
    assert escaped.json() == {"echo": "***"} and UPSTREAM_KEY not in escaped.text
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="alpha", messages=messages, user="cut")
    assert e.value.status_code == 502
    assert chat(client, PROMPTS[0], "beta").choices  # heads without an upstream still rewrite
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["status"] for r in log] == [200, 200, 200, 429, 200, 502] and log[0]["rewrite"] == expected
    assert log[2]["rewrite"] is None
    assert UPSTREAM_KEY not in (tmp_path / "log.jsonl").read_text()


def test_command_line_refusals(prompter, monkeypatch):
    monkeypatch.delenv("NOPE", raising=False)
    with pytest.raises(serve.UsageError, match="NOPE: the variable is not set"):
        serve.load(serve.parse_args(["--lora", str(prompter / "lora"), "--api-key-env", "NOPE"]))
    with pytest.raises(serve.UsageError, match="upstream 'gamma' has no head"):
        serve.load(serve.parse_args(["--lora", str(prompter / "lora"), "--upstream", "gamma=http://127.0.0.1:9"]))
    import socket
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        with pytest.raises(serve.UsageError, match=f"cannot listen on 127.0.0.1:{port} .* choose another --port"):
            serve.main(serve.parse_args(["--lora", str(prompter / "lora"), "--port", port]))
    with pytest.raises(serve.UsageError, match="give NAME=VALUE"):
        serve.load(serve.parse_args(["--lora", str(prompter / "lora"), "--upstream", "http://x"]))
    with pytest.raises(serve.UsageError, match=r"lora: a stage-1 LoRA adapter, not a Phi-2 checkpoint; pass it as "
                                               "--lora"):
        serve.load(serve.parse_args(["--model", str(prompter / "lora")]))
    with pytest.raises(serve.UsageError, match=r"lora: a folder; give a head's .safetensors file"):
        serve.load(serve.parse_args(["--lora", str(prompter / "lora"), "--head", str(prompter / "lora")]))


def test_health_model_retrieval_and_one_access_log_line_per_request(prompter, monkeypatch):
    api, url = launch(prompter, monkeypatch)
    api.log = io.StringIO()
    client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=60)
    assert client.models.retrieve("alpha").id == "alpha"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-5")
    health = httpx.get(url.removesuffix("/v1") + "/health").json()
    assert health["status"] == "ok" and health["models"] == ["base", "alpha", "beta"] and health["waiting"] == 0
    reply = chat(client, PROMPTS[0], max_tokens=8)

    def logged(n):  # a line is written once the reply's body has gone out, just after the client has it
        wait_for(lambda: len(api.log.getvalue().splitlines()) >= n, 2)
        return [json.loads(line) for line in api.log.getvalue().splitlines()]

    lines = logged(4)
    assert [(r["method"], r["path"], r["status"]) for r in lines] == [
        ("GET", "/v1/models/alpha", 200), ("GET", "/v1/models/gpt-5", 404), ("GET", "/health", 200),
        ("POST", "/v1/chat/completions", 200)]
    last = lines[-1]
    assert (last["model"], last["prompt_tokens"], last["completion_tokens"]) == (
        "alpha", reply.usage.prompt_tokens, reply.usage.completion_tokens)
    assert last["ms"] > 0 and "prompt" not in last and PROMPTS[0] not in api.log.getvalue()
    api.log_prompts = True
    list(chat(client, PROMPTS[1], max_tokens=8, stream=True))  # a stream is logged when it ends
    assert logged(5)[-1]["prompt"] == PROMPTS[1]


def test_a_web_page_cannot_use_the_server(prompter, monkeypatch):
    """A cross-site form or text/plain POST (no preflight), a Host that is not the server's (DNS rebinding) and a
    foreign Origin are refused before anything runs; no CORS header unless --cors-origin allows the page."""
    upstream = Upstream()
    monkeypatch.setenv("UP_KEY", UPSTREAM_KEY)
    api, url = launch(prompter, monkeypatch, "--upstream", f"alpha={upstream.url}", "--upstream-key-env",
                      "alpha=UP_KEY", "--cors-origin", "https://app.example")
    body = json.dumps({"model": "alpha", "messages": [{"role": "user", "content": PROMPTS[0]}]})
    auth = {"Authorization": f"Bearer {KEY}"}
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None):
        headers = {**auth, **({"Content-Type": kind} if kind else {})}
        r = httpx.post(f"{url}/chat/completions", content=body, headers=headers)
        assert r.status_code == 415 and "Content-Type: application/json" in r.json()["error"]["message"], kind
    port = url.split(":")[2].split("/")[0]
    r = httpx.post(f"{url}/chat/completions", content=body, headers={**auth, "Content-Type": "application/json",
                                                                     "Host": f"evil.example:{port}"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"
    r = httpx.post(f"{url}/chat/completions", content=body, headers={**auth, "Content-Type": "application/json",
                                                                     "Origin": "https://evil.example"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
    assert upstream.received == []  # none of them reached the upstream (nor spent its key)
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in httpx.options(f"{url}/chat/completions", headers=preflight).headers
    allowed = {**preflight, "Origin": "https://app.example"}
    r = httpx.options(f"{url}/chat/completions", headers=allowed)
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    ok = httpx.post(f"{url}/chat/completions", content=body, timeout=60,
                    headers={**auth, "Content-Type": "application/json", "Host": f"localhost:{port}",
                             "Origin": "https://app.example"})
    assert ok.status_code == 200 and len(upstream.received) == 1


def test_a_long_stop_string_is_refused_and_a_stop_string_never_leaks_its_first_character(prompter, monkeypatch):
    from phi2.generation import _releasable
    api, url = launch(prompter, monkeypatch)
    client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError, match="each stop string may be at most 1000 characters"):
        chat(client, PROMPTS[0], stop=["x" * 1_000_000])
    started = time.perf_counter()  # the longest allowed stop strings cost each token little
    chat(client, PROMPTS[0], stop=["a" * 999 + "b", "ab" * 500, "é" * 1000, "z" * 1000], max_tokens=24)
    assert time.perf_counter() - started < 20
    # a multi-byte character split across tokens: its first bytes decode to U+FFFD; what comes before it and could
    # begin a stop string waits too ("x", which "xé" begins), and the cut removes it
    assert _releasable("ab x\ufffd", ["x\u00e9"]) == ("ab ", False)
    assert _releasable("ab x\u00e9!", ["x\u00e9"]) == ("ab ", True)
    assert _releasable("ab " + "a" * 5000, ["a" * 999 + "b"]) == ("ab " + "a" * 4001, False)  # 999 held back


def test_the_proxy_log_is_checked_at_start_and_an_answer_already_paid_for_is_never_dropped(prompter, monkeypatch,
                                                                                           tmp_path, capfd):
    upstream = Upstream()
    monkeypatch.setenv("UP_KEY", UPSTREAM_KEY)
    proxy = ["--upstream", f"alpha={upstream.url}", "--upstream-key-env", "alpha=UP_KEY"]
    with pytest.raises(serve.UsageError, match="--log .*nowhere/log.jsonl: cannot write there"):
        launch(prompter, monkeypatch, *proxy, "--log", str(tmp_path / "nowhere" / "log.jsonl"))
    assert upstream.received == []
    (tmp_path / "logs").mkdir()
    api, url = launch(prompter, monkeypatch, *proxy, "--log", str(tmp_path / "logs" / "log.jsonl"))
    (tmp_path / "logs" / "log.jsonl").unlink()
    (tmp_path / "logs").rmdir()  # the folder goes away while the server runs
    client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=60)
    reply = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": PROMPTS[0]}])
    assert reply.choices[0].message.content == "upstream answer (key ***)" and len(upstream.received) == 1
    assert "the request was answered, not logged" in capfd.readouterr().err
    # SSE lines without the space after `data:` are redacted too
    streamed = list(client.chat.completions.create(model="alpha", stream=True, user="tight",
                                                   messages=[{"role": "user", "content": PROMPTS[0]}]))
    assert "".join(c.choices[0].delta.content for c in streamed) == "***"


def test_kv_memory_is_bounded_up_front(prompter, monkeypatch, capsys):
    launch(prompter, monkeypatch, "--max-kv-gb", "0.000001")  # a few slots: not one default request
    assert re.search(r"warning: \d+ KV slots hold less than one request with the default --max-tokens \(24",
                     capsys.readouterr().err)
    api, url = launch(prompter, monkeypatch, "--max-kv-gb", "0.0001")  # a few hundred slots of the tiny model
    assert "warning" not in capsys.readouterr().err
    client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=60)
    assert api.engine.kv_slots < 96 * 16
    with pytest.raises(openai.BadRequestError, match="KV cache slots"):
        chat(client, PROMPTS[0], n=16, max_tokens=30)
    assert chat(client, PROMPTS[0], max_tokens=8).choices  # one that fits still runs


def test_a_stop_lets_the_requests_finish_and_a_second_ctrl_c_cuts_them_quietly(prompter):
    """serve.py itself, in a process: one SIGINT says what it waits for and lets the replies end; a second
    stops at once, with the cut replies logged as 499 and no traceback."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    def server():
        p = subprocess.Popen([sys.executable, str(Path(serve.__file__)), "--lora", str(prompter / "lora"), "--head",
                              str(prompter / "alpha.safetensors"), "--device", "cpu", "--precision", "fp32",
                              "--port", "0", "--max-batch", "1", "--max-queue", "1000"],
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        for line in p.stderr:
            if line.startswith("serving "):
                return p, line.split(" on ")[1].split()[0]
        pytest.fail(f"serve.py did not start: {p.wait()}")

    def ask(url, replies, n=16):
        body = {"model": "alpha", "prompt": PROMPTS[0], "n": n, "max_tokens": 24, "stream": True}
        try:
            with httpx.stream("POST", f"{url}/completions", json=body, timeout=60) as r:
                replies.append("".join(r.iter_text()))
        except httpx.HTTPError as e:
            replies.append(type(e).__name__)

    for signals in ([signal.SIGINT], [signal.SIGINT, signal.SIGINT]):
        p, url = server()
        replies = []
        clients = [threading.Thread(target=ask, args=(url, replies), daemon=True) for _ in range(6)]
        for client in clients:
            client.start()
        health = url.removesuffix("/v1") + "/health"
        assert wait_for(lambda health=health: httpx.get(health).json()["running"], 10)
        for sig in signals:
            p.send_signal(sig)
            time.sleep(0.3)
        err = p.stderr.read()
        assert p.wait(timeout=60) in (0, 130) and "Traceback" not in err, err[-2000:]
        for client in clients:
            client.join(timeout=10)
        statuses = [r["status"] for r in (json.loads(line) for line in err.splitlines() if line.startswith("{"))
                    if r["path"] == "/v1/completions"]
        assert re.search(r"^serve.py: stopping: \d+ choices running or waiting finish first \(at most 30 s; "
                         r"Ctrl-C again stops now\)$", err, re.M)
        if len(signals) == 1:  # every reply ended as it should
            assert statuses == [200] * 6 and all(r.endswith("data: [DONE]\n\n") for r in replies)
        else:
            assert "serve.py: stopping now; the requests in flight are cut" in err and 499 in statuses
