"""evaluate.py against real HTTP servers on 127.0.0.1 standing in for the target and the judge.

The target answers a prompt with as many words as the prompt has characters over 4 ("w w w ..."), so an
answer's length is known from its prompt; scripted judges prefer position A, or the longer answer. The
expected tables are computed here from the prompts alone, not by evaluate.py's code.
"""

import html
import json
import re
import socket
import threading
from xml.etree import ElementTree

import numpy as np
import pytest

import evaluate
from support.llm import FAILED_IN_A_ROW
from tests.servers import LoopbackServer, completion, send_json

KEY = "sk-eval-test-0123456789"
ANSWER = re.compile(r"\[The Start of Answer (A|B)\]\n(.*?)\n\[The End of Answer \1\]", re.S)
INSTRUCTION = re.compile(r"\[Instruction\]\n(.*?)\n\n\[The Start of Answer A\]", re.S)


def answer_for(prompt: str) -> str:
    return " ".join(["w"] * (len(prompt) // 4 + 1))


class ChatServer(LoopbackServer):
    """A chat-completions endpoint: reply(body) -> text, or an int status, or "drop" (close the connection
    unanswered); records the user message of every request it receives."""

    def __init__(self, reply):
        self.reply, self.seen, self.lock = reply, [], threading.Lock()
        super().__init__(self.respond)
        self.url += "/v1"

    def respond(self, handler, data):
        body = json.loads(data)
        assert handler.headers["Authorization"] == f"Bearer {KEY}"
        with self.lock:
            self.seen.append(body["messages"][-1]["content"])
        result = self.reply(body)
        if result == "drop":
            handler.close_connection = True
            return handler.connection.close()
        if isinstance(result, int):
            return send_json(handler, result, {"error": {"message": "slow down"}}, {"Retry-After": "1"})
        send_json(handler, 200, completion(result))


@pytest.fixture
def servers():
    made = []
    yield lambda reply: made.append(ChatServer(reply)) or made[-1]
    for s in made:
        s.close()


def target_reply(body):
    return answer_for(body["messages"][-1]["content"])


def longer_wins(body):
    a, b = (m.group(2) for m in ANSWER.finditer(body["messages"][-1]["content"]))
    verdict = "A" if len(a) > len(b) else "B" if len(b) > len(a) else "C"
    return f"The better answer is the longer one. [[{verdict}]]"


# eight instructions in two categories; rewrites longer, shorter or as long as the original
INSTRUCTIONS = [("write a poem", "writing"), ("explain why the sky is blue", "science"),
                ("list three fruits", "writing"), ("describe photosynthesis in detail", "science"),
                ("summarise the plot of hamlet", "writing"), ("what is entropy", "science"),
                ("give me a recipe", "writing"), ("define gravity", "science")]
REWRITES = {"write a poem": "Write a rhyming poem of four stanzas about autumn leaves",
            "explain why the sky is blue": "Why is the sky blue?",
            "list three fruits": "name three fruit",  # an answer as long as the original's
            "describe photosynthesis in detail": "Describe photosynthesis step by step, with the chemistry",
            "summarise the plot of hamlet": "Hamlet plot?",
            "what is entropy": "Explain entropy in thermodynamics and in information theory, with examples",
            "give me a recipe": "Give me a vegetarian pasta recipe for two with a shopping list",
            "define gravity": "gravity?"}


@pytest.fixture
def files(tmp_path):
    instructions = tmp_path / "alpaca_eval.json"
    instructions.write_text(json.dumps([{"instruction": i, "dataset": c} for i, c in INSTRUCTIONS]))
    rewrites = tmp_path / "rewrites.jsonl"
    rewrites.write_text("".join(json.dumps({"instruction": i, "rewrite": r}) + "\n" for i, r in REWRITES.items()))
    return instructions, rewrites


def run(target, judge, files, tmp_path, monkeypatch, sleep=lambda seconds: None, **kw):
    monkeypatch.setenv("EVAL_KEY", KEY)
    instructions, rewrites = files
    base = dict(instructions=str(instructions), rewrites=str(rewrites), out=str(tmp_path / "out"),
                target_url=target.url, target_model="target-1", target_key_env="EVAL_KEY", judge_url=judge.url,
                judge_model="judge-1", judge_key_env="EVAL_KEY", cache=str(tmp_path / "cache.jsonl"),
                concurrency=4, retry_base=0.001, timeout=5.0, bootstrap=500)
    return evaluate.main(evaluate.EvalConfig(**{**base, **kw}), sleep=sleep)


def expected_pairwise(pairs):
    """(wins, ties, losses) of the optimised side when the longer answer wins, from the prompts alone."""
    outcome = [np.sign(len(answer_for(r)) - len(answer_for(i))) for i, r in pairs]
    return outcome.count(1), outcome.count(0), outcome.count(-1)


def test_a_judge_that_always_prefers_position_a_gives_only_ties(servers, files, tmp_path, monkeypatch):
    target, judge = servers(target_reply), servers(lambda body: "Answer A is better. [[A]]")
    results = run(target, judge, files, tmp_path, monkeypatch)
    overall = results["overall"]
    assert (overall["n"], overall["wins"], overall["ties"], overall["losses"]) == (8, 0, 8, 0)
    assert overall["win_rate"] == 0.5 and overall["ci95"] == [0.5, 0.5]


def test_a_judge_preferring_longer_answers_gives_the_table_computed_here(servers, files, tmp_path, monkeypatch,
                                                                         capsys):
    target, judge = servers(target_reply), servers(longer_wins)
    results = run(target, judge, files, tmp_path, monkeypatch)
    wins, ties, losses = expected_pairwise(REWRITES.items())
    overall = results["overall"]
    assert (overall["wins"], overall["ties"], overall["losses"]) == (wins, ties, losses) == (4, 1, 3)
    assert overall["win_rate"] == (wins + ties / 2) / 8
    for category in ("writing", "science"):
        pairs = [(i, REWRITES[i]) for i, c in INSTRUCTIONS if c == category]
        w, t, lost = expected_pairwise(pairs)
        assert (results["categories"][category]["wins"], results["categories"][category]["ties"],
                results["categories"][category]["losses"]) == (w, t, lost)
    # 8 originals + 8 rewrites answered; 2 judgments per item, each asked once (the item whose two answers
    # are the same text needs only one: both orders are the same request)
    assert len(target.seen) == 16 and len(judge.seen) == len(set(judge.seen)) == 15
    assert all(INSTRUCTION.search(p).group(1) in dict(INSTRUCTIONS) for p in judge.seen)  # the original instruction
    out = tmp_path / "out"
    rows = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(len(r["verdict_judgments"]) == 2 for r in rows)
    assert json.loads((out / "results.json").read_text())["overall"] == overall
    page = (out / "report.html").read_text()
    assert "<!doctype html>" in page and "Hamlet plot?" in page and "win rate" in page
    assert "writing" in capsys.readouterr().out

    # a second run against the same cache sends nothing
    again = run(target, judge, files, tmp_path, monkeypatch)
    assert again["requests_sent"] == {"target": 0, "judge": 0} and len(target.seen) == 16
    assert again["overall"] == overall


def test_reference_mode_judges_each_side_against_the_reference(servers, files, tmp_path, monkeypatch):
    reference = tmp_path / "model_outputs.json"
    outputs = {i: answer_for("x" * 30) for i, _ in INSTRUCTIONS}  # a reference of fixed length
    reference.write_text(json.dumps([{"instruction": i, "output": o, "generator": "ref"} for i, o in outputs.items()]))
    target, judge = servers(target_reply), servers(longer_wins)
    results = run(target, judge, files, tmp_path, monkeypatch, reference=str(reference))

    def score(prompt, ref):
        return float(np.sign(len(answer_for(prompt)) - len(ref)) / 2 + 0.5)

    original = [score(i, outputs[i]) for i, _ in INSTRUCTIONS]
    optimised = [score(REWRITES[i], outputs[i]) for i, _ in INSTRUCTIONS]
    overall = results["overall"]
    assert results["mode"] == "reference"
    assert overall["win_rate_original"] == np.mean(original) and overall["win_rate_optimised"] == np.mean(optimised)
    assert overall["difference"] == pytest.approx(np.mean(optimised) - np.mean(original))
    low, high = overall["ci95_difference"]
    assert low <= overall["difference"] <= high


def test_a_reply_without_a_verdict_is_counted_unparsed(servers, files, tmp_path, monkeypatch):
    def judge_reply(body):
        if "[Instruction]\nwhat is entropy\n" in body["messages"][-1]["content"]:
            return "Both answers have merits; I cannot decide."
        return longer_wins(body)

    results = run(servers(target_reply), servers(judge_reply), files, tmp_path, monkeypatch)
    assert results["unparsed"] == 1 and results["judged"] == 7 and results["overall"]["n"] == 7
    lines = (tmp_path / "out" / "judgments.jsonl").read_text().splitlines()
    rows = {r["instruction"]: r for r in map(json.loads, lines)}
    assert rows["what is entropy"]["status"] == "unparsed" and rows["what is entropy"]["verdict"] is None
    assert evaluate.parse_verdict("[[A]] ... or rather [[B]]") is None  # two verdicts: not guessed either


def test_429_with_retry_after_is_waited_out(servers, files, tmp_path, monkeypatch):
    calls = []
    target = servers(lambda body: 429 if not calls.append(1) and len(calls) <= 2 else target_reply(body))
    slept = []
    results = run(target, servers(longer_wins), files, tmp_path, monkeypatch, sleep=slept.append)
    assert results["incomplete"] == 0 and results["judged"] == 8
    assert slept.count(1.0) == 2  # the server's Retry-After: 1, twice


def test_dropped_connections_are_completed_by_a_rerun_without_repeating_a_request(servers, files, tmp_path,
                                                                                  monkeypatch):
    healthy, served, dropped = [True], [], []

    def flaky(body):  # the 7th to 9th requests are dropped: fewer in a row than stop a run
        if len(served) >= 6 and healthy[0] and len(dropped) < 3:
            dropped.append(1)
            return "drop"
        served.append(1)
        return target_reply(body)

    target, judge = servers(flaky), servers(longer_wins)
    first = run(target, judge, files, tmp_path, monkeypatch, max_retries=0)
    assert first["incomplete"] > 0 and first["failed_requests"] == 3
    failed_first = set(target.seen[6:9])
    healthy[0] = False
    target.seen.clear()
    second = run(target, judge, files, tmp_path, monkeypatch, max_retries=0)
    assert second["incomplete"] == 0 and second["judged"] == 8
    assert sorted(target.seen) == sorted(failed_first)  # only the failed ones asked again


def test_a_server_failing_every_request_stops_the_run_and_a_rerun_completes_it(servers, files, tmp_path,
                                                                              monkeypatch):
    down = [True]
    target = servers(lambda body: 404 if down[0] else target_reply(body))
    judge = servers(longer_wins)
    stop = (rf"HTTP 404 slow down \(is {target.url} the API's base URL, which usually ends in /v1, and 'target-1' a "
            rf"model it serves\?\); stopping: {FAILED_IN_A_ROW} requests in a row to {target.url} failed so; rerun "
            "once it answers$")
    with pytest.raises(evaluate.LLMError, match=stop):
        run(target, judge, files, tmp_path, monkeypatch, max_retries=0)
    assert FAILED_IN_A_ROW <= len(target.seen) < 16  # stopped, not every request failed in turn
    down[0] = False
    results = run(target, judge, files, tmp_path, monkeypatch, max_retries=0)
    assert results["incomplete"] == 0 and results["judged"] == 8
    # requests refused one by one (a 400: too long, filtered) say nothing about the server: the run goes on
    refusing = servers(lambda body: 400)
    results = run(refusing, judge, files, tmp_path, monkeypatch, max_retries=0)
    assert results["failed_requests"] == 16 and results["incomplete"] == 8


def test_a_rerun_from_the_cache_needs_no_server_and_fails_only_the_requests_it_lacks(servers, files, tmp_path,
                                                                                     monkeypatch, capsys):
    refused = [i for i, _ in INSTRUCTIONS[:5]]

    def judge_reply(body):  # the judge refuses five items' judgments (9 requests, more than FAILED_IN_A_ROW: one
        # item's two answers are the same text, asked once): the cache lacks them
        if INSTRUCTION.search(body["messages"][-1]["content"]).group(1) in refused:
            return 400
        return longer_wins(body)

    target, judge = servers(target_reply), servers(judge_reply)
    first = run(target, judge, files, tmp_path, monkeypatch, max_retries=0)
    assert first["incomplete"] == 5 and first["judged"] == 3
    target.close(), judge.close()
    capsys.readouterr()
    again = run(target, judge, files, tmp_path, monkeypatch, bootstrap=200)  # offline: a new table all the same
    assert (again["judged"], again["incomplete"], again["failed_requests"]) == (3, 5, 9)
    assert again["overall"]["wins"] == first["overall"]["wins"] and again["requests_sent"]["target"] == 0
    err = capsys.readouterr().err
    assert f"warning: cannot reach {target.url}" in err and f"warning: cannot reach {judge.url}" in err
    assert f"cannot reach {judge.url}, and this request is not in the cache" in err

    # not a rerun: the server is needed, said at once. A rewrite whose answer is not in the cache, another
    # cache, or rewrites still to be made by a prompter (which is not loaded)
    instructions, rewrites = files
    monkeypatch.setattr(evaluate.Prompter, "load", lambda *a, **k: pytest.fail("the prompter was loaded"))
    for kw in (dict(rewrites=None, lora=str(tmp_path / "adapter")), dict(cache=str(tmp_path / "other.jsonl"))):
        with pytest.raises(evaluate.LLMError, match=rf"cannot reach {target.url} .*is the URL right\?$"):
            run(target, judge, files, tmp_path, monkeypatch, **kw)
    records = [json.loads(line) for line in rewrites.read_text().splitlines()]
    records[0]["rewrite"] += " please"
    rewrites.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(evaluate.LLMError, match=rf"cannot reach {target.url} "):
        run(target, judge, files, tmp_path, monkeypatch)


def test_a_judge_reply_without_a_verdict_is_asked_again_by_a_rerun(servers, files, tmp_path, monkeypatch):
    mode = ["undecided"]

    def judge_reply(body):
        if "[Instruction]\nwhat is entropy\n" in body["messages"][-1]["content"]:
            if mode[0] == "undecided":
                return "Both answers have merits; I cannot decide."
            if mode[0] == "down":
                return 500
        return longer_wins(body)

    target, judge = servers(target_reply), servers(judge_reply)
    assert run(target, judge, files, tmp_path, monkeypatch)["unparsed"] == 1
    mode[0] = "down"  # asked again in vain: the reply it had stands (unparsed, not incomplete)
    results = run(target, judge, files, tmp_path, monkeypatch, max_retries=0)
    assert (results["unparsed"], results["incomplete"], results["failed_requests"]) == (1, 0, 0)
    mode[0], asked = "decided", len(judge.seen)
    results = run(target, judge, files, tmp_path, monkeypatch)
    assert results["unparsed"] == 0 and results["judged"] == 8 and len(judge.seen) == asked + 2  # both orders


def test_bootstrap_interval_matches_the_exact_bootstrap_distribution():
    """For scores in {0, 0.5, 1}, the bootstrap distribution of the mean is that of a sum of n draws from
    the empirical distribution: computed exactly by convolution, its 2.5% and 97.5% points match."""
    scores = [1.0] * 21 + [0.5] * 7 + [0.0] * 12
    n = len(scores)
    pmf_one = np.bincount([int(s * 2) for s in scores], minlength=3) / n  # over half-points 0, 1, 2
    pmf = np.array([1.0])
    for _ in range(n):
        pmf = np.convolve(pmf, pmf_one)
    cdf, means = np.cumsum(pmf), np.arange(len(pmf)) / (2 * n)
    exact = means[np.searchsorted(cdf, 0.025)], means[np.searchsorted(cdf, 0.975)]
    low, high = evaluate.bootstrap_interval(scores, 20000, seed=0)
    assert abs(low - exact[0]) <= 0.02 and abs(high - exact[1]) <= 0.02
    assert evaluate.bootstrap_interval(scores, 500, seed=3) == evaluate.bootstrap_interval(scores, 500, seed=3)


def test_instruction_formats(tmp_path):
    vicuna = tmp_path / "vicuna.jsonl"
    vicuna.write_text(json.dumps({"question_id": 1, "text": "Tell a joke", "category": "fun"}) + "\n")
    dolly = tmp_path / "dolly.jsonl"
    dolly.write_text(json.dumps({"instruction": "Summarise this", "context": "A long text.", "category": "sum"}) + "\n"
                     + json.dumps({"instruction": "Name a colour", "context": "", "category": "qa"}) + "\n")
    plain = tmp_path / "plain.csv"
    plain.write_text("question,topic\nWhy?,x\n")
    text = tmp_path / "plain.txt"
    text.write_text("first\n\nsecond\n")
    assert [(i.instruction, i.category) for i in evaluate.read_instructions(vicuna)] == [("Tell a joke", "fun")]
    assert [i.instruction for i in evaluate.read_instructions(dolly)] == ["Summarise this\n\nA long text.",
                                                                          "Name a colour"]
    assert [i.instruction for i in evaluate.read_instructions(plain, field="question")] == ["Why?"]
    assert [i.instruction for i in evaluate.read_instructions(text)] == ["first", "second"]
    with pytest.raises(evaluate.EvalError, match=r"plain.csv:2: no instruction .* --field"):
        evaluate.read_instructions(plain)
    items = [evaluate.Item(str(i), str(i)) for i in range(10)]
    assert evaluate.sample(items, 4, seed=1) == evaluate.sample(items, 4, seed=1) != evaluate.sample(items, 4, seed=2)


def test_the_prompter_rewrites_and_no_key_reaches_a_file(servers, tmp_path, monkeypatch, capsys):
    """Rewrites by a tiny stage-1 adapter and head (greedy), then the whole run; a key that the target
    echoes back reaches no file. An instruction longer than the prompter's context is evaluated as it is,
    counted as an empty rewrite."""
    import train_head
    import train_sft
    from prompts import DEFAULT_DATA

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(DEFAULT_DATA.read_text().splitlines(keepends=True)[:20]))
    common = ["--data", str(data), "--max-steps", "1", "--device", "cpu", "--precision", "fp32"]
    train_sft.main(train_sft.parse_args(["--model", "tiny", "--run-dir", str(tmp_path / "sft"), "--rank", "4",
                                         *common]))
    train_head.main(train_head.parse_args(["--target", "t", "--lora", str(tmp_path / "sft" / "best"), "--out",
                                           str(tmp_path / "t.safetensors"), "--run-dir", str(tmp_path / "head"),
                                           *common]))
    instructions = tmp_path / "instructions.txt"
    too_long = "explain " * 600  # the tiny prompter's context is 512 tokens
    instructions.write_text(f"write a poem\nexplain taxes\n{too_long}\n")
    monkeypatch.setenv("EVAL_KEY", KEY)
    # a careless target that echoes the key it was sent: it must reach no file
    target, judge = servers(lambda body: f"{target_reply(body)} (key {KEY})"), servers(longer_wins)
    cfg = evaluate.parse_args([
        "--instructions", str(instructions), "--lora", str(tmp_path / "sft" / "best"), "--head",
        str(tmp_path / "t.safetensors"), "--max-new-tokens", "6", "--device", "cpu", "--precision", "fp32",
        "--target-url", target.url, "--target-model", "target-1", "--target-key-env", "EVAL_KEY",
        "--judge-url", judge.url, "--judge-model", "judge-1", "--judge-key-env", "EVAL_KEY",
        "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache.jsonl")])
    results = evaluate.main(cfg)
    assert results["items"] == 3 and results["judged"] + results["unparsed"] == 3 and results["empty_rewrites"] == 1
    assert "1 instructions are longer than the prompter's context of 512 tokens" in capsys.readouterr().err
    rows = [json.loads(line) for line in (tmp_path / "out" / "judgments.jsonl").read_text().splitlines()]
    assert rows[2]["rewrite"] == rows[2]["instruction"] == too_long.strip()  # the original, sent as it is
    assert too_long.strip() in target.seen
    rewrites = list((tmp_path / "out").glob("rewrites-*.jsonl"))
    made = [json.loads(line) for line in rewrites[0].read_text().splitlines()]  # the one too long too, as ""
    assert len(rewrites) == 1 and len(made) == 3 and {r["input"]: r["output"] for r in made}[too_long.strip()] == ""
    for path in [*(tmp_path / "out").iterdir(), tmp_path / "cache.jsonl"]:
        assert KEY not in path.read_text(), path
    assert results["rewritten_by"] == {"model": None, "lora": str(tmp_path / "sft" / "best"),
                                       "head": str(tmp_path / "t.safetensors")}
    # a smaller --limit reuses the rewrites made: the prompter is not called again
    monkeypatch.setattr(evaluate.Prompter, "load", classmethod(lambda *a, **k: pytest.fail("rewrote again")))
    cfg.limit = 2
    assert evaluate.main(cfg)["items"] == 2 and len(list((tmp_path / "out").glob("rewrites-*.jsonl"))) == 1


def test_the_cache_skips_a_line_cut_short_and_appends_after_it(tmp_path):
    from support.llm import Cache
    path = tmp_path / "cache.jsonl"
    path.write_text(json.dumps({"key": "a", "request": {}, "answer": "one"}) + "\n" + '{"key": "b", "answ')
    cache = Cache(path)
    assert cache.get("a") == "one" and cache.get("b") is None
    cache.put("c", {}, "three")
    cache.put("d", {}, "four")
    again = Cache(path)
    assert [again.get(k) for k in "abcd"] == ["one", None, "three", "four"]
    assert path.read_text().count("\n") == 4 and not again.cut_short


# ------------------------------------------------------------------------------------------ the report


SVG = "{http://www.w3.org/2000/svg}"


def drawn_charts(page: str) -> list[list[dict]]:
    """Each chart of report.html as drawn: for each row, its label and the value, low and high that the dot and
    the bar stand at, read back through the axis's scale (from its tick labels), beside the data-* numbers."""
    charts = []
    for svg in re.findall(r"<svg .*?</svg>", page, re.S):
        root = ElementTree.fromstring(svg)
        ticks = []
        for text in root.iter(f"{SVG}text"):
            try:
                ticks.append((float(text.text), float(text.get("x"))))
            except (TypeError, ValueError):
                continue
        (v0, x0), (v1, x1) = min(ticks), max(ticks)
        at = lambda x: v0 + (float(x) - x0) * (v1 - v0) / (x1 - x0)  # noqa: B023
        rows = []
        for g in root.iter(f"{SVG}g"):
            if g.get("class") != "row":
                continue
            line, dot = g.find(f"{SVG}line"), g.find(f"{SVG}circle")
            rows.append({"label": g.get("data-label"), "drawn": (at(dot.get("cx")), at(line.get("x1")),
                                                                  at(line.get("x2"))),
                         "data": tuple(float(g.get(k)) for k in ("data-value", "data-low", "data-high"))})
        charts.append(rows)
    return charts


def assert_drawn(rows: list[dict], expected: list[tuple[str, float, list]]):
    """rows draw expected: (label, value, [low, high]) each, in order; the positions to within a pixel."""
    assert [r["label"] for r in rows] == [label for label, _, _ in expected]
    for row, (_, value, (low, high)) in zip(rows, expected):
        assert row["data"] == (value, low, high)
        assert row["drawn"] == pytest.approx((value, low, high), abs=0.005)


def test_the_report_draws_results_json_and_filters_items_by_verdict(servers, files, tmp_path, monkeypatch):
    run(servers(target_reply), servers(longer_wins), files, tmp_path, monkeypatch)
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    rows = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    page = (out / "report.html").read_text()
    groups = [("overall", results["overall"]), *results["categories"].items()]
    assert [name for name, _ in groups] == ["overall", "science", "writing"]
    [chart] = drawn_charts(page)
    assert_drawn(chart, [(f"{name} (n={s['n']})", s["win_rate"], s["ci95"]) for name, s in groups])
    # the answer first: the chart comes before the table, which comes before the first item
    assert page.index("<svg") < page.index("<table") < page.index('<section class="item')
    # items named by their place in the one-line JSON file, each marked with its verdict for the filters
    sections = re.findall(r'<section class="item (\w+)" id="item-(\d+)"><h3><a href="#item-\d+">([^<]*)</a>', page)
    assert [(kind, int(i), name) for kind, i, name in sections] == [
        (r["verdict"], i, f"alpaca_eval.json #{i + 1}") for i, r in enumerate(rows)]
    assert [r["source"] for r in rows] == [f"{files[0]} #{i}" for i in range(1, 9)]
    for kind, count in (("win", 4), ("tie", 1), ("loss", 3)):
        assert re.search(rf'<label for="show-{kind}">[^<]* \({count}\)</label>', page)
        assert f"#show-{kind}:checked ~ .items .item:not(.{kind})" in page  # the CSS that filters


def test_reference_mode_draws_both_sides_and_the_difference_and_shows_the_reference(servers, files, tmp_path,
                                                                                      monkeypatch):
    reference = tmp_path / "model_outputs.json"
    outputs = {i: f"reference {n}: " + answer_for("x" * 30) for n, (i, _) in enumerate(INSTRUCTIONS)}
    reference.write_text(json.dumps([{"instruction": i, "output": o} for i, o in outputs.items()]))
    run(servers(target_reply), servers(longer_wins), files, tmp_path, monkeypatch, reference=str(reference))
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    page = (out / "report.html").read_text()
    groups = [("overall", results["overall"]), *results["categories"].items()]
    sides, difference = drawn_charts(page)
    assert_drawn(sides, [(f"{name} (n={s['n']}) {side}", s[f"win_rate_{side}"], s[f"ci95_{side}"])
                         for name, s in groups for side in ("original", "optimised")])
    assert_drawn(difference, [(f"{name} (n={s['n']})", s["difference"], s["ci95_difference"]) for name, s in groups])
    assert re.search(r'<text [^>]*>-1</text>', page.split("<svg")[2])  # the difference's axis runs from -1
    rows = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    assert [r["reference"] for r in rows] == list(outputs.values())
    items = page.split('<section class="item')[1:]
    assert len(items) == 8 and all(html.escape(r["reference"]) in item for r, item in zip(rows, items))


def test_a_repeated_instruction_gets_its_own_reference_at_each_place():
    items = [evaluate.Item(f"f #{i}", text) for i, text in enumerate(["a", "b", "a", "a"])]
    evaluate.attach_references(items, {"a": ["first a", "second a"], "b": ["b's"]}, "refs.json")
    assert [item.reference for item in items] == ["first a", "b's", "second a", "second a"]
    with pytest.raises(evaluate.EvalError, match=r"refs.json: no reference output for 1 of 1 .* e.g. f #0"):
        evaluate.attach_references([evaluate.Item("f #0", "c")], {"a": ["x"]}, "refs.json")


def test_items_are_named_by_their_place_in_the_file_and_their_id(tmp_path):
    one_line = tmp_path / "inst.json"
    one_line.write_text(json.dumps([{"instruction": "a", "id": 7}, {"instruction": "b"},
                                    {"instruction": "c", "id": "q-3"}]))
    assert [i.source for i in evaluate.read_instructions(one_line)] == [
        f"{one_line} #1 (id 7)", f"{one_line} #2", f"{one_line} #3 (id q-3)"]
    lines = tmp_path / "questions.jsonl"
    lines.write_text("\n" + json.dumps({"question_id": 81, "text": "x"}) + "\n" + json.dumps({"text": "y"}) + "\n")
    assert [i.source for i in evaluate.read_instructions(lines)] == [f"{lines}:2 (id 81)", f"{lines}:3"]
    one_line.write_text(json.dumps([{"instruction": "a"}, {"question": "b"}]))
    with pytest.raises(evaluate.EvalError, match=r"inst.json #2: no instruction \(fields: question\)"):
        evaluate.read_instructions(one_line)
    one_line.write_text(json.dumps([{"instruction": "a"}, {"text": "  "}]))
    with pytest.raises(evaluate.EvalError, match=r"inst.json #2: the instruction is empty"):
        evaluate.read_instructions(one_line)


# ------------------------------------------------------------------------------------- second hardening


def generate_json(rewrites_by_target: dict) -> str:
    """What generate.py --json prints with one head per target: a record per (instruction, target)."""
    return "".join(json.dumps({"index": n, "source": f"i.txt:{n + 1}", "input": i, "target": target, "output": r})
                   + "\n" for target, rewrites in rewrites_by_target.items()
                   for n, (i, r) in enumerate(rewrites.items()))


def test_rewrites_for_several_targets_are_picked_by_name_or_refused(servers, files, tmp_path, monkeypatch):
    instructions, _ = files
    other = {i: "x" for i in REWRITES}  # the other head's rewrites: the shortest possible, losing everywhere
    two = tmp_path / "two-heads.jsonl"
    two.write_text(generate_json({"mistral": REWRITES, "concise": other}))
    target, judge = servers(target_reply), servers(longer_wins)
    with pytest.raises(evaluate.EvalError, match=r"two-heads.jsonl: rewrites for 2 targets \(concise, mistral\); "
                                                 r"pick one with --rewrites-target NAME"):
        run(target, judge, (instructions, two), tmp_path, monkeypatch)
    with pytest.raises(evaluate.EvalError, match=r"no rewrites for the target gpt .* targets are: concise, mistral"):
        run(target, judge, (instructions, two), tmp_path, monkeypatch, rewrites_target="gpt")
    assert not target.seen and not judge.seen  # refused before any request
    results = run(target, judge, (instructions, two), tmp_path, monkeypatch, rewrites_target="mistral")
    assert (results["overall"]["wins"], results["overall"]["ties"], results["overall"]["losses"]) == (4, 1, 3)
    results = run(target, judge, (instructions, two), tmp_path, monkeypatch, rewrites_target="concise")
    assert results["overall"]["losses"] == 8
    # without targets, a second and different rewrite of one instruction is refused too; the same one twice is not
    doubled = tmp_path / "doubled.jsonl"
    doubled.write_text("".join(json.dumps({"instruction": i, "rewrite": r}) + "\n" for i, r in REWRITES.items())
                       + json.dumps({"instruction": "define gravity", "rewrite": "gravity?"}) + "\n"
                       + json.dumps({"instruction": "write a poem", "rewrite": "a sonnet"}) + "\n")
    with pytest.raises(evaluate.EvalError, match=r"doubled.jsonl:10: another rewrite of the instruction of "
                                                 r".*doubled.jsonl:1, not the same; keep one"):
        evaluate.read_rewrites(doubled)
    with pytest.raises(evaluate.EvalError, match="picks among the targets of a --rewrites file"):
        run(target, judge, (instructions, None), tmp_path, monkeypatch, rewrites=None, rewrites_target="mistral",
            lora="x")


def strict_json(text):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("mode", ["pairwise", "reference"])
def test_nothing_judged_is_null_in_results_json_not_nan(servers, files, tmp_path, monkeypatch, mode):
    kw = {}
    if mode == "reference":
        kw["reference"] = str(tmp_path / "model_outputs.json")
        (tmp_path / "model_outputs.json").write_text(json.dumps([{"instruction": i, "output": "ref"}
                                                                 for i, _ in INSTRUCTIONS]))
    results = run(servers(target_reply), servers(lambda body: "I cannot decide."), files, tmp_path, monkeypatch, **kw)
    assert results["judged"] == 0 and results["unparsed"] == 8
    saved = strict_json((tmp_path / "out" / "results.json").read_text())
    keys = ["win_rate", "ci95"] if mode == "pairwise" else ["win_rate_original", "ci95_original",
                                                             "win_rate_optimised", "ci95_optimised", "difference",
                                                             "ci95_difference"]
    assert all(saved["overall"][k] in (None, [None, None]) for k in keys) and saved["overall"]["n"] == 0
    for line in (tmp_path / "out" / "judgments.jsonl").read_text().splitlines():
        strict_json(line)
    page = (tmp_path / "out" / "report.html").read_text()
    assert "No item was judged" in page and "not judged" in page


def test_text_that_is_not_unicode_is_one_line_naming_its_place(tmp_path):
    latin1 = tmp_path / "instructions.txt"
    latin1.write_bytes("first\nna\u00efve caf\u00e9\n".encode("latin-1"))
    with pytest.raises(evaluate.UsageError, match=r"instructions.txt:2: not UTF-8 text; save it as UTF-8"):
        evaluate.read_instructions(latin1)
    lone = tmp_path / "inst.json"
    lone.write_text('[{"instruction": "fine"}, {"instruction": "half a pair \\ud83d here"}]')
    with pytest.raises(evaluate.EvalError, match=r"inst.json #2: the instruction holds a lone surrogate"):
        evaluate.read_instructions(lone)
    lone.write_text('[{"instruction": "fine", "dataset": "\\udc00"}]')
    with pytest.raises(evaluate.EvalError, match=r"inst.json #1: the category holds a lone surrogate"):
        evaluate.read_instructions(lone)
    (tmp_path / "plain.txt").write_text("a rewrite\n")  # generate.py's output without --json
    with pytest.raises(evaluate.EvalError, match=r"plain.txt: a .txt has no instruction beside each rewrite; write "
                                                 r"the rewrites with generate.py --json"):
        evaluate.read_rewrites(tmp_path / "plain.txt")
    rewrites = tmp_path / "rewrites.jsonl"
    rewrites.write_text('{"instruction": "fine", "rewrite": "ok"}\n{"instruction": "x", "rewrite": "\\ud800"}\n')
    with pytest.raises(evaluate.EvalError, match=r"rewrites.jsonl:2: the rewrite holds a lone surrogate"):
        evaluate.read_rewrites(rewrites)
    rewrites.write_text('{"instruction": "\\udfff", "output": "ok"}\n')
    with pytest.raises(evaluate.EvalError, match=r"rewrites.jsonl:1: the instruction holds a lone surrogate"):
        evaluate.read_references(rewrites)


def test_an_endpoint_that_is_not_there_is_named_before_the_prompter_loads(servers, tmp_path, monkeypatch):
    """A target that refuses connections, and URLs without a scheme: one line naming it, before the prompter
    is loaded, any rewrite written or any retry waited."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    monkeypatch.setattr(evaluate.Prompter, "load", lambda *a, **k: pytest.fail("the prompter was loaded"))
    instructions = tmp_path / "i.txt"
    instructions.write_text("write a poem\n")
    slept = []
    judge = servers(longer_wins)
    for url, message in [(f"http://127.0.0.1:{port}/v1", rf"cannot reach http://127.0.0.1:{port}/v1 \(.*refused"),
                         ("127.0.0.1:8000/v1", r"--target-url 127.0.0.1:8000/v1: give an http:// or https:// URL"),
                         ("localhost:8000/v1", r"--target-url localhost:8000/v1: give an http:// or https:// URL")]:
        with pytest.raises(evaluate.UsageError, match=message) as e:
            run(type("S", (), {"url": url}), judge, (instructions, None), tmp_path, monkeypatch, sleep=slept.append,
                rewrites=None, lora=str(tmp_path / "adapter"))
        assert "\n" not in str(e.value)
    monkeypatch.delenv("NO_KEY_HERE", raising=False)
    with pytest.raises(evaluate.UsageError, match=r"variable NO_KEY_HERE \(name another one with --judge-key-env;"):
        run(judge, judge, (instructions, None), tmp_path, monkeypatch, rewrites=None, judge_key_env="NO_KEY_HERE")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(evaluate.EvalError, match=r"--out .*a-file/sub: cannot be made \(Not a directory\)"):
        run(judge, judge, (instructions, None), tmp_path, monkeypatch, rewrites=None, lora=str(tmp_path / "adapter"),
            out=str(tmp_path / "a-file" / "sub"))
    assert not slept and not judge.seen and not list((tmp_path / "out").glob("rewrites-*"))
