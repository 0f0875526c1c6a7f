"""target_data.py against a small OpenAI-compatible server on 127.0.0.1: results, retries, the concurrency
bound, resuming after a crash, and the API key never appearing in any output."""

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import target_data
from tests.servers import LoopbackServer, completion, send_json

KEY = "sk-test-SECRET-7f3a9c"
ROOT = Path(__file__).resolve().parents[1]


class FakeLLM(LoopbackServer):
    """A chat-completions server: improves prompts as "Improved: <prompt>", after failing each prompt with
    the statuses in fail[prompt] first ("empty": a reply without text); records attempts and the most
    requests in flight at once."""

    def __init__(self, delay=0.0, fail=None, reject_key=False):
        self.delay, self.fail, self.reject_key = delay, dict(fail or {}), reject_key
        self.attempts, self.in_flight, self.max_in_flight = [], 0, 0
        self.lock = threading.Lock()
        super().__init__(self.respond)
        self.url += "/v1"

    def respond(self, handler, data):
        body = json.loads(data)
        prompt = body["messages"][-1]["content"]
        with self.lock:
            self.attempts.append(prompt)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            failures = self.fail.get(prompt, [])
            status = failures.pop(0) if failures else 200
        time.sleep(self.delay)
        with self.lock:  # done before the reply is written: once a client has it, this request is not counted
            self.in_flight -= 1
        if self.reject_key or handler.headers["Authorization"] != f"Bearer {KEY}":
            # a careless server that echoes the credentials it got
            return send_json(handler, 401, {"error": f"invalid key {handler.headers['Authorization']}"})
        if status == "empty":
            return send_json(handler, 200, completion(" "))
        if status != 200:
            return send_json(handler, status, {"error": "try later"}, {"Retry-After": "0"})
        assert body["messages"][0]["role"] == "system" and body["model"] == "target-1"
        send_json(handler, 200, completion(f"Improved: {prompt}"))


@pytest.fixture
def server_factory():
    servers = []

    def make(**kw):
        servers.append(FakeLLM(**kw))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("".join(f"prompt number {i}\n" for i in range(12)))
    return path


def config(server, prompts_file, out, **kw):
    base = dict(base_url=server.url, model="target-1", out=str(out), data=str(prompts_file), api_key_env="TEST_KEY",
                concurrency=3, retry_base=0.001, timeout=5.0, cache="")
    return target_data.TargetDataConfig(**{**base, **kw})


def read_out(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_every_prompt_is_improved_once(server_factory, prompts_file, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_KEY", KEY)
    server = server_factory(delay=0.02)
    summary = target_data.main(config(server, prompts_file, tmp_path / "out.jsonl"))
    records = read_out(tmp_path / "out.jsonl")
    assert summary == {"asked": 12, "written": 12, "failed": 0}
    assert sorted(r["prompt"] for r in records) == sorted(f"prompt number {i}" for i in range(12))
    assert all(r["improved"] == f"Improved: {r['prompt']}" and r["target"] == "target-1" for r in records)


def test_an_output_of_another_target_is_refused_untouched(server_factory, prompts_file, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_KEY", KEY)
    server = server_factory()
    target_data.main(config(server, prompts_file, tmp_path / "out.jsonl"))
    before = (tmp_path / "out.jsonl").read_bytes()
    other = target_data.TargetDataConfig(**{**vars(config(server, prompts_file, tmp_path / "out.jsonl")),
                                            "model": "target-2"})
    with pytest.raises(target_data.TargetDataError, match=r"out.jsonl:1: improved by 'target-1', not --model "
                                                          r"'target-2': one file per target"):
        target_data.main(other)
    assert (tmp_path / "out.jsonl").read_bytes() == before


def test_concurrency_is_bounded(server_factory, prompts_file, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_KEY", KEY)
    server = server_factory(delay=0.1)
    target_data.main(config(server, prompts_file, tmp_path / "out.jsonl", concurrency=3))
    assert server.max_in_flight == 3  # reached, never passed


def test_retries_on_429_5xx_then_gives_up_cleanly(server_factory, prompts_file, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_KEY", KEY)
    fail = {"prompt number 1": [429, 500], "prompt number 2": [503], "prompt number 3": [500] * 10,
            "prompt number 4": [400], "prompt number 5": ["empty"] * 10, "prompt number 6": ["empty"]}
    server = server_factory(fail=fail)
    summary = target_data.main(config(server, prompts_file, tmp_path / "out.jsonl", max_retries=3))
    done = {r["prompt"] for r in read_out(tmp_path / "out.jsonl")}
    assert summary["failed"] == 3 and not {"prompt number 3", "prompt number 4", "prompt number 5"} & done
    assert {"prompt number 1", "prompt number 2", "prompt number 6"} <= done
    assert server.attempts.count("prompt number 1") == 3 and server.attempts.count("prompt number 3") == 4
    assert server.attempts.count("prompt number 4") == 1  # a 400 is not retried
    assert server.attempts.count("prompt number 5") == 2  # an empty reply is asked again once, not 3 times
    # a rerun (the server healthy again) asks only for what failed
    server.attempts.clear()
    server.fail.clear()
    summary = target_data.main(config(server, prompts_file, tmp_path / "out.jsonl", max_retries=3))
    assert sorted(set(server.attempts)) == ["prompt number 3", "prompt number 4", "prompt number 5"]
    assert summary["written"] == 3


def test_resume_after_a_crash(server_factory, prompts_file, tmp_path):
    server = server_factory(delay=0.15)
    out = tmp_path / "out.jsonl"
    argv = [sys.executable, str(ROOT / "target_data.py"), "--base-url", server.url, "--model", "target-1",
            "--out", str(out), "--data", str(prompts_file), "--api-key-env", "TEST_KEY", "--concurrency", "2",
            "--cache", ""]
    env = {"TEST_KEY": KEY, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 20
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 4):
        time.sleep(0.05)
    proc.kill()  # a crash: no cleanup, requests in flight are lost
    proc.communicate()
    with open(out, "a") as f:
        f.write('{"prompt": "prompt number 9", "impro')  # and a line cut short
    first = {r for r in out.read_text().splitlines()[:-1]}
    assert 4 <= len(first) < 12
    server.attempts.clear()
    result = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    records = read_out(out)
    prompts = [r["prompt"] for r in records]
    assert sorted(prompts) == sorted(f"prompt number {i}" for i in range(12))  # all, each once
    assert len(server.attempts) == 12 - len(first)  # only what was missing was asked again


def test_the_key_never_appears(server_factory, prompts_file, tmp_path):
    out = tmp_path / "out.jsonl"
    argv = [sys.executable, str(ROOT / "target_data.py"), "--model", "target-1", "--data", str(prompts_file),
            "--api-key-env", "TEST_KEY", "--concurrency", "2", "--out", str(out), "--cache", "", "--retry-base", "0.05"]
    env = {"TEST_KEY": KEY, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    good = server_factory(fail={"prompt number 0": [500, 500]})
    ok = subprocess.run(argv + ["--base-url", good.url], env=env, cwd=ROOT, capture_output=True, text=True)
    refusing = server_factory(reject_key=True)
    bad = subprocess.run(argv + ["--base-url", refusing.url, "--out", str(tmp_path / "other.jsonl")], env=env,
                         cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0 and bad.returncode == 2
    assert "refused the API key (HTTP 401); check $TEST_KEY" in bad.stderr
    for text in (ok.stdout, ok.stderr, bad.stdout, bad.stderr, out.read_text()):
        assert KEY not in text


def test_missing_key_is_a_clear_error(prompts_file, tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    cfg = target_data.TargetDataConfig(base_url="http://127.0.0.1:9", model="m", out=str(tmp_path / "o.jsonl"),
                                       data=str(prompts_file), api_key_env="NO_SUCH_KEY")
    with pytest.raises(target_data.LLMError, match=r"environment variable NO_SUCH_KEY \(name another one with "
                                                   r"--api-key-env; a server that needs no key takes any value"):
        target_data.main(cfg)


def test_empty_replies_never_stop_the_run(server_factory, prompts_file, tmp_path, monkeypatch):
    """A reply without text is this prompt's failure, not the endpoint's: even without retries, 12 of them in a row
    do not end the run as a dead endpoint would (8 in a row)."""
    monkeypatch.setenv("TEST_KEY", KEY)
    server = server_factory(fail={f"prompt number {i}": ["empty"] * 3 for i in range(12)})
    summary = target_data.main(config(server, prompts_file, tmp_path / "out.jsonl", max_retries=0))
    assert summary["failed"] == 12 and len(server.attempts) == 12
