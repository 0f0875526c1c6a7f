"""Issue 16's findings that are fixed, each tried the way an attacker or a careless user would: a redirect
that would carry the API key away, a key echoed back, a Retry-After of days, a malformed response, a damaged
checkpoint or adapter, a config.json with a string for a number, and flags out of range."""

import json
import socket
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora
import phi2
import target_data
import train_head
import train_sft
from phi2.errors import UsageError
from prompts import DEFAULT_DATA
from support import training
from support.prompter import Prompter
from tests.servers import LoopbackServer, send_json
from tests.test_target_data import KEY, FakeLLM

REPLY = {"choices": [{"message": {"role": "assistant", "content": "Improved."}}]}


class Server(LoopbackServer):
    """A loopback server whose POST handler is `respond(handler)`; records each request's headers."""

    def __init__(self, respond):
        self.requests = []
        super().__init__(lambda handler, body: self.requests.append(dict(handler.headers)) or respond(handler))


@pytest.fixture
def servers():
    made = []
    yield lambda respond: made.append(Server(respond)) or made[-1]
    for s in made:
        s.close()


def run_target_data(url, tmp_path, monkeypatch, sleep=time.sleep, prompts=("a prompt",)):
    """target_data.main on the prompts against url; sleep: what backoff sleeps with."""
    monkeypatch.setenv("TEST_KEY", KEY)
    lines = "".join(f"{prompt} {i}\n" for i, prompt in enumerate(prompts)) if len(prompts) > 1 else f"{prompts[0]}\n"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(lines)
    cfg = target_data.TargetDataConfig(base_url=url, model="m", out=str(tmp_path / "out.jsonl"), data=str(prompts),
                                       api_key_env="TEST_KEY", retry_base=0.001, timeout=5.0, cache="")
    return target_data.main(cfg, sleep=sleep)


def test_a_redirect_to_another_origin_is_refused_and_gets_no_key(servers, tmp_path, monkeypatch):
    elsewhere = servers(lambda h: send_json(h, 200, REPLY))
    redirecting = servers(lambda h: send_json(h, 302, {}, {"Location": elsewhere.url + "/v1/chat/completions"}))
    # another port is another origin: the key must not go there, and its answer must not become data
    with pytest.raises(target_data.LLMError, match="redirected to another origin.*refused"):
        run_target_data(redirecting.url + "/v1", tmp_path, monkeypatch)
    assert elsewhere.requests == [] and not (tmp_path / "out.jsonl").read_text()


def test_a_key_too_short_to_be_a_secret_is_not_masked_in_answers(monkeypatch):
    """A local server that needs no key gets any value, often a word: masking it would damage the answers."""
    from support.llm import LLM
    for key, masked in (("none", "Context: none given."), ("sk-0123456789abcdef", "key *** here")):
        monkeypatch.setenv("SOME_KEY", key)
        llm = LLM("http://127.0.0.1:9/v1", "m", "SOME_KEY")
        assert llm.redact(masked.replace("***", key)) == masked


def test_a_key_echoed_in_an_answer_never_reaches_the_output(tmp_path, monkeypatch):
    server = FakeLLM()
    # the fake improves prompts as "Improved: <prompt>": a prompt holding the key makes the server echo it
    monkeypatch.setenv("TEST_KEY", KEY)
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"please repeat {KEY}\n")
    cfg = target_data.TargetDataConfig(base_url=server.url, model="target-1", out=str(tmp_path / "out.jsonl"),
                                       data=str(prompts), api_key_env="TEST_KEY", retry_base=0.001, timeout=5.0,
                                       cache="")
    try:
        target_data.main(cfg)
    finally:
        server.close()
    record = json.loads((tmp_path / "out.jsonl").read_text())
    assert KEY not in record["improved"] and record["improved"] == "Improved: please repeat ***"


def test_retry_after_is_capped(servers, tmp_path, monkeypatch):
    calls = []
    server = servers(lambda h: send_json(h, 429, {}, {"Retry-After": "864000"}) if not calls.append(1)
                     and len(calls) == 1 else send_json(h, 200, REPLY))
    slept = []
    assert run_target_data(server.url + "/v1", tmp_path, monkeypatch, sleep=slept.append)["written"] == 1
    assert slept and max(slept) == target_data.MAX_RETRY_AFTER  # ten days asked, two minutes given


def test_a_malformed_status_line_or_a_cut_body_is_retried(tmp_path, monkeypatch):
    """A raw socket server: first a garbage status line, then a body shorter than its Content-Length, then a
    JSON content type on a body that is not JSON, then a good answer (after the start-up probe's 404). The run
    writes the pair, with no traceback."""
    body = json.dumps(REPLY).encode()
    answers = [b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
               b"garbage\r\n\r\n",
               b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n" + body[:10],
               b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n"
               b'{"choices": [ {',
               b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body]
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def serve():
        for answer in answers:
            conn, _ = listener.accept()
            conn.recv(65536)
            conn.sendall(answer)
            time.sleep(0.05)
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
        assert run_target_data(url, tmp_path, monkeypatch)["written"] == 1
    finally:
        listener.close()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_checkpoint_with_non_finite_weights_is_refused_naming_the_tensor(tiny_checkpoint, tmp_path, bad):
    import shutil
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.1.mlp.fc1.weight"][3, 5] = bad
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(phi2.CheckpointError, match="tensor 'model.layers.1.mlp.fc1.weight' holds NaN or infinite"):
        phi2.load_model(folder)


def test_an_adapter_with_non_finite_weights_is_refused(tiny_checkpoint, tmp_path):
    import lora
    model = lora.inject(phi2.load_model(tiny_checkpoint), rank=2, alpha=4.0)
    lora.save_adapter(model, tmp_path / "adapter")
    file = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(file)
    name = next(iter(tensors))
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, file)
    with pytest.raises(lora.AdapterError, match="holds NaN or infinite values"):
        lora.load_adapter(phi2.load_model(tiny_checkpoint), tmp_path / "adapter")


@pytest.mark.parametrize("key, value", [("hidden_size", "2560"), ("num_hidden_layers", 2.5),
                                        ("layer_norm_eps", "1e-5"), ("vocab_size", True)])
def test_config_with_the_wrong_type_is_one_line(tmp_path, key, value):
    hf = phi2.PRESETS["tiny"].to_hf_dict()
    hf[key] = value
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(phi2.ConfigError, match=f"'{key}' is {value!r}; it must be a"):
        phi2.Phi2Config.from_hf_json(tmp_path / "config.json")


def test_max_len_beyond_the_context_stops_before_training(tmp_path):
    with pytest.raises(training.TrainingError, match="--max-len 4096 is longer than the model's context of 512"):
        train_sft.main(train_sft.TrainConfig(model="tiny", run_dir=str(tmp_path), max_len=4096, max_steps=2))


@pytest.mark.parametrize("argv, message", [
    (["--grad-clip", "-1"], "argument --grad-clip: -1 must be above 0"),  # was gradient ascent
    (["--grad-clip", "0"], "argument --grad-clip: 0 must be above 0"),  # trained nothing
    (["--batch-size", "-2"], "argument --batch-size: -2 must be at least 1"),  # losses 0
    (["--max-steps", "0"], "argument --max-steps: 0 must be at least 1"),  # was ignored
    (["--epochs", "0"], "argument --epochs: 0 must be at least 1"),  # saved an untrained best/
    (["--lr", "inf"], "argument --lr: inf is not a finite number"),
    (["--batch-size", "two"], "argument --batch-size: 'two' is not an integer"),
])
def test_out_of_range_flags_are_refused_in_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        train_sft.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_target_name_cannot_leave_its_folder():
    with pytest.raises(training.TrainingError, match="a target's name is letters, digits and"):
        train_head.HeadConfig(target="../../x", data="d.jsonl")


def test_a_new_run_never_replaces_an_existing_head(tmp_path):
    from prompts import DATA_DIR, DEFAULT_DATA
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(DEFAULT_DATA.read_text().splitlines(keepends=True)[:40]))
    train_sft.main(train_sft.TrainConfig(model="tiny", data=str(data), run_dir=str(tmp_path / "sft"), max_steps=2,
                                         batch_size=4, grad_accum=1, rank=2))
    out = tmp_path / "concise.safetensors"
    out.write_bytes(b"a trained head, hours of work")
    cfg = dict(target="concise", data=str(DATA_DIR / "targets" / "concise.jsonl"), lora=str(tmp_path / "sft" / "best"),
               out=str(out), run_dir=str(tmp_path / "head"), max_steps=2, batch_size=8, grad_accum=1, max_len=256)
    with pytest.raises(training.TrainingError, match="already exists .* choose another --out, or pass --overwrite"):
        train_head.main(train_head.HeadConfig(**cfg))
    assert out.read_bytes() == b"a trained head, hours of work"
    train_head.main(train_head.HeadConfig(**cfg, overwrite=True))
    assert out.read_bytes() != b"a trained head, hours of work"


def test_an_unrelated_output_file_is_refused_untouched(servers, tmp_path, monkeypatch):
    server = servers(lambda h: send_json(h, 200, REPLY))
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"my notes\nsecond line without a newline")
    monkeypatch.setenv("TEST_KEY", KEY)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a prompt\n")
    cfg = target_data.TargetDataConfig(base_url=server.url + "/v1", model="m", out=str(out), data=str(prompts),
                                       api_key_env="TEST_KEY")
    with pytest.raises(target_data.TargetDataError, match="out.jsonl:1: not a record of this script"):
        target_data.main(cfg)
    assert out.read_bytes() == b"my notes\nsecond line without a newline"


def test_a_base_killed_while_being_written_is_never_taken_for_one(tmp_path, monkeypatch):
    def killed(model, folder, **kw):  # the config lands, then the process dies before the weights
        (folder / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
        raise KeyboardInterrupt
    monkeypatch.setattr(phi2, "save_hf_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        train_sft.prepare_base(train_sft.TrainConfig(model="tiny"), [], tmp_path)
    assert not (tmp_path / "base").exists()


def test_a_resaved_adapter_keeps_its_identity(tmp_path):
    """Re-saving an adapter with its metadata in another order changes the file's bytes, not its identity."""
    from safetensors import safe_open

    import head_adapter
    folder = tmp_path / "a"
    folder.mkdir()
    tensors = {"b.lora_B.weight": torch.randn(8, 4), "a.lora_A.weight": torch.randn(4, 8)}
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"x": "1", "y": "2"})
    before = head_adapter.stage1_id(folder)
    with safe_open(folder / "adapter_model.safetensors", "pt") as f:
        again = {k: f.get_tensor(k) for k in reversed(list(f.keys()))}
    save_file(again, folder / "adapter_model.safetensors", metadata={"y": "2", "x": "1", "format": "pt"})
    assert head_adapter.stage1_id(folder) == before
    save_file({**again, "a.lora_A.weight": again["a.lora_A.weight"] + 1e-3}, folder / "adapter_model.safetensors")
    assert head_adapter.stage1_id(folder) != before


def test_resume_refuses_changed_data_and_out_of_the_wrong_kind(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(DEFAULT_DATA.read_text().splitlines(keepends=True)[:20]))
    cfg = dict(model="tiny", data=str(data), run_dir=str(tmp_path / "run"), batch_size=4, grad_accum=1, rank=4,
               max_steps=2, device="cpu", precision="fp32")
    train_sft.main(train_sft.TrainConfig(**cfg, stop_after=1))
    data.write_text(data.read_text().replace("a", "A", 1))
    with pytest.raises(training.TrainingError, match="started on another data .* resume with the one it started with"):
        train_sft.main(train_sft.TrainConfig(**cfg, resume=True))
    (tmp_path / "file").write_text("x")
    with pytest.raises(training.TrainingError, match="--out .*file is a file, but a folder goes there"):
        train_sft.main(train_sft.TrainConfig(**{**cfg, "run_dir": str(tmp_path / "r2")}, out=str(tmp_path / "file")))
    with pytest.raises(training.TrainingError, match="--run-dir .*file is a file"):
        train_sft.main(train_sft.TrainConfig(**{**cfg, "run_dir": str(tmp_path / "file")}))


def test_a_base_resaved_in_another_dtype_keeps_its_fingerprint(tmp_path):
    """fp32 -> bf16 -> fp16 copies of one base, with weights small enough that fp16 rounds them to subnormals
    or to zero, all have one fingerprint (a head or adapter trained on one loads on the others); a base whose
    weights moved by a little does not."""
    from phi2.weights import fingerprint
    model = phi2.build_model("tiny")
    with torch.no_grad():
        model.layers[0].mlp.fc1.weight.mul_(1e-6)  # ~2e-8: below fp16's smallest normal, some below its subnormals
        model.layers[1].mlp.fc2.weight.mul_(3e-3)
    prints = set()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        phi2.save_hf_checkpoint(model.to(dtype), tmp_path / str(dtype))
        prints |= {fingerprint(phi2.load_model(tmp_path / str(dtype), dtype=d)) for d in (torch.float32, dtype)}
    assert len(prints) == 1
    with torch.no_grad():
        dense = model.float().layers[2].self_attn.dense.weight
        dense.add_(1e-3 * torch.randn_like(dense))
    assert fingerprint(model) not in prints


def test_adapters_and_heads_from_before_the_sign_bit_fingerprint_still_load(tiny_checkpoint, tmp_path):
    import head_adapter
    from phi2.weights import legacy_fingerprint
    model = phi2.load_model(tiny_checkpoint)
    old = legacy_fingerprint(model)
    lora.inject(model, rank=2, alpha=2.0)
    lora.save_adapter(model, tmp_path / "old", base_path=tiny_checkpoint, base_fingerprint=old)
    lora.save_adapter(model, tmp_path / "other", base_path=tiny_checkpoint, base_fingerprint="0123456789abcdef")
    prompter = Prompter.load(None, tmp_path / "old")  # accepted
    merged, stage1 = prompter.model, prompter.stage1
    head_adapter.save_head(head_adapter.HeadAdapter(merged.lm_head), tmp_path / "h.safetensors", "t", merged, old,
                           stage1)
    assert prompter.add_head(tmp_path / "h.safetensors").target == "t"
    with pytest.raises(lora.AdapterError, match="trained on another base model"):
        Prompter.load(None, tmp_path / "other")


# ------------------------------------------------ the second round: support/llm.py and target_data.py


def test_backoff_is_capped_keeps_its_jitter_and_never_overflows(monkeypatch):
    """--max-retries 20 once waited up to 2**19 s (6 days) between two tries; --max-retries 2000 overflowed."""
    from support.llm import LLM, MAX_BACKOFF, RequestFailed, _Retryable
    monkeypatch.setenv("TEST_KEY", KEY)
    slept = []
    llm = LLM("http://127.0.0.1:9/v1", "m", "TEST_KEY", max_retries=2000, retry_base=1.0, sleep=slept.append)
    monkeypatch.setattr(llm, "_call", lambda messages, params: (_ for _ in ()).throw(_Retryable("HTTP 503")))
    with pytest.raises(RequestFailed, match=r"http://127.0.0.1:9/v1: gave up after 2000 retries: HTTP 503"):
        llm.chat([{"role": "user", "content": "hi"}])
    assert len(slept) == 2000 and max(slept) <= MAX_BACKOFF
    assert 0.5 <= slept[0] <= 1.0 and 8 <= slept[4] <= 16  # doubling from retry_base, with jitter
    late = slept[-100:]
    assert min(late) >= MAX_BACKOFF / 2 and len(set(late)) == 100  # capped, and still spread out


@pytest.mark.parametrize("url", ["127.0.0.1:8000/v1", "localhost:8000/v1", "ftp://127.0.0.1/v1", "http:///v1",
                                 "http://127.0.0.1:port/v1", "http://127.0.0.1:8000 /v1", ""])
def test_a_url_that_is_not_http_with_a_host_is_one_line_at_start(tmp_path, monkeypatch, url):
    """Was: retried for minutes as a connection error, or refused as a redirect to another origin."""
    slept = []
    with pytest.raises(target_data.LLMError, match=r"^--base-url .*give an http:// or https:// URL") as e:
        run_target_data(url, tmp_path, monkeypatch, sleep=slept.append)
    assert "\n" not in str(e.value) and not slept


def test_an_endpoint_that_refuses_connections_is_named_before_any_prompt(tmp_path, monkeypatch):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{closed.getsockname()[1]}/v1"
    closed.close()  # nothing listens there now
    slept = []
    with pytest.raises(target_data.LLMError, match=rf"^cannot reach {url} \(.*refused.*\): is the server running"):
        run_target_data(url, tmp_path, monkeypatch, sleep=slept.append)
    assert not slept and not (tmp_path / "out.jsonl").exists()


def test_a_failed_request_names_its_endpoint(servers, tmp_path, monkeypatch, capsys):
    """A server that drops every chat request unanswered: the failure says where, and why."""
    server = servers(lambda h: h.connection.close())
    assert run_target_data(server.url + "/v1", tmp_path, monkeypatch, sleep=lambda s: None)["failed"] == 1
    err = capsys.readouterr().err
    assert f"prompts.txt:1: {server.url}/v1: gave up after 6 retries: APIConnectionError" in err
    assert "Server disconnected" in err  # the cause, not only "Connection error."


def test_a_refusal_without_an_openai_error_body_says_what_the_server_sent(servers, tmp_path, monkeypatch, capsys):
    """A 404 with a page, not OpenAI's error JSON (a URL without its /v1 on some servers): its text is the detail,
    with the hint; and such failures in a row stop the run."""
    server = servers(lambda h: send_json(h, 404, None, raw=b"<h1>Nothing  here</h1>"))
    with pytest.raises(target_data.LLMError, match=rf"{server.url}: HTTP 404 <h1>Nothing here</h1> \(is {server.url} "
                                                   "the API's base URL"):
        run_target_data(server.url, tmp_path, monkeypatch, sleep=lambda s: None, prompts=["p"] * 8)


def test_a_lone_surrogate_in_a_prompt_or_a_reply_is_no_traceback(servers, tmp_path, monkeypatch):
    """Half a UTF-16 surrogate pair (a JSON "\\ud800" escape alone) cannot be encoded as UTF-8: a prompt holding
    one is refused naming its line; a reply holding one is kept with U+FFFD in its place."""
    monkeypatch.setenv("TEST_KEY", KEY)
    server = servers(lambda h: send_json(h, 200, None, raw=b'{"choices": [{"message": {"content": "ok \\ud800!"}}]}'))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "fine"}\n{"prompt": "half \\udc00 a pair"}\n')
    cfg = dict(base_url=server.url + "/v1", model="m", out=str(tmp_path / "out.jsonl"), data=str(prompts),
               api_key_env="TEST_KEY", retry_base=0.001, timeout=5.0, cache=str(tmp_path / "cache.jsonl"))
    with pytest.raises(target_data.TargetDataError, match=r"prompts.jsonl:2: the prompt holds a lone surrogate"):
        target_data.main(target_data.TargetDataConfig(**cfg))
    assert not server.requests
    prompts.write_text('{"prompt": "fine"}\n')
    assert target_data.main(target_data.TargetDataConfig(**cfg))["written"] == 1
    assert json.loads((tmp_path / "out.jsonl").read_text())["improved"] == "ok \ufffd!"
    from support.llm import LLM, RequestFailed
    llm = LLM(server.url + "/v1", "m", "TEST_KEY", max_retries=0)
    with pytest.raises(RequestFailed, match="lone surrogate"):  # any other caller: one request fails, not the run
        llm.chat([{"role": "user", "content": "\ud800"}])


@pytest.mark.parametrize("text", [b"[" * 5000, b'{"eos_token": 5}', b'{"eos_token": {"content": 7}}', b"[]",
                                  b"\xff\xfe", b'{"n": ' + b"1" * 5000 + b"}"])
def test_a_damaged_tokenizer_config_is_one_line(tiny_checkpoint, tmp_path, text):
    import shutil
    shutil.copy(tiny_checkpoint / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_bytes(text)
    with pytest.raises(phi2.tokenizer.TokenizerError, match="tokenizer_config.json: .*download it again or delete it"):
        phi2.load_tokenizer(tmp_path)


@pytest.mark.parametrize("text", [b"[" * 5000, b'{"weight_map": []}', b'{"weight_map": {"a": 1}}', b"\xff",
                                  b'{"weight_map": ' + b"1" * 5000 + b"}"])
def test_a_damaged_shard_index_is_one_line(tmp_path, text):
    (tmp_path / "model.safetensors.index.json").write_bytes(text)
    with pytest.raises(phi2.CheckpointError, match="model.safetensors.index.json: .*download it again"):
        phi2.weights.checkpoint_files(tmp_path)


SECRET = "sk-proj-AbCdEf1234567890secret"
NAMELIKE = "gsk_AbCdEf1234567890secret"  # a key that is also a valid variable name
EVALUATE = ["evaluate", "--instructions", "i.jsonl", "--out", "o", "--target-url", "http://127.0.0.1:9/v1",
            "--target-model", "t", "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "j"]


@pytest.mark.parametrize("argv, said", [
    (["target_data", "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--out", "o.jsonl", "--api-key-env",
      SECRET], "not the key itself"),
    ([*EVALUATE, "--judge-key-env", SECRET], "not the key itself"),
    ([*EVALUATE, "--judge-key", NAMELIKE], "unrecognized arguments: --judge-key <hidden>"),  # no abbreviation
    ([*EVALUATE, f"--target-key={NAMELIKE}"], "unrecognized arguments: --target-key=<hidden>"),
    ([*EVALUATE, "--judge-token", "x", NAMELIKE], "unrecognized arguments: --judge-token <hidden> <hidden>"),
    (["serve", "--api-key-env", SECRET], "not the key itself"),
])
def test_a_key_given_for_a_variable_name_is_not_printed(argv, said, capsys):
    """A --...-key-env flag takes a variable's name; the key itself, given by mistake, is refused unrepeated."""
    import importlib
    with pytest.raises(SystemExit):
        importlib.import_module(argv[0]).parse_args(argv[1:])
    err = capsys.readouterr().err
    assert SECRET not in err and NAMELIKE not in err and said in err, err


def test_a_key_that_is_a_valid_name_is_not_printed_when_unset(tmp_path, monkeypatch):
    """gsk_..., hf_... keys are valid variable names: the 'not set' messages do not repeat them."""
    import serve
    from support.llm import LLM, LLMError
    monkeypatch.delenv(NAMELIKE, raising=False)
    with pytest.raises(LLMError) as refused:
        LLM("http://127.0.0.1:9/v1", "m", NAMELIKE, key_flag="--api-key-env")
    assert NAMELIKE not in str(refused.value) and "its name is not repeated" in str(refused.value)
    cfg = serve.parse_args(["--upstream", "t=http://127.0.0.1:9/v1", "--upstream-key-env", f"t={NAMELIKE}"])
    with pytest.raises(UsageError) as refused:
        serve.upstreams_of(cfg, {"base": None, "t": object()})
    assert NAMELIKE not in str(refused.value)
    with pytest.raises(UsageError) as refused:
        serve.pairs_of([SECRET], "--upstream-key-env")
    assert SECRET not in str(refused.value)


def test_serve_refuses_a_head_named_base_before_loading(tmp_path, tiny_cfg, monkeypatch):
    import head_adapter
    import serve
    model = phi2.build_model(tiny_cfg)
    head_adapter.save_head(head_adapter.HeadAdapter(model.lm_head), tmp_path / "b.safetensors", "base", model, "fp",
                           "none")
    monkeypatch.setattr(serve.Prompter, "load", classmethod(lambda *a, **k: pytest.fail("loaded first")))
    with pytest.raises(UsageError, match=r"b.safetensors: its target is named 'base', the model name of stage 1"):
        serve.load(serve.parse_args(["--head", str(tmp_path / "b.safetensors")]))


def test_out_of_memory_is_one_line_with_what_to_change(capsys):
    from support import cli

    def main(_):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
                                     "23.6 GiB of which 1.2 GiB is free.\nOf the allocated memory ...")
    with pytest.raises(SystemExit) as stopped:
        cli.run("train_sft.py", main, lambda argv: None)
    err = capsys.readouterr().err
    assert stopped.value.code == 1 and err.count("\n") == 1
    assert err.startswith("train_sft.py: error: out of memory on the device (CUDA out of memory); to train, try a "
                          "smaller --batch-size")

    def mps(_):  # MPS says it with a RuntimeError
        raise RuntimeError("MPS backend out of memory (MPS allocated: 18.10 GB, max allowed: 20.13 GB). Tried to "
                           "allocate 256.00 MB on private pool.")
    with pytest.raises(SystemExit):
        cli.run("train_sft.py", mps, lambda argv: None)
    assert "(MPS backend out of memory (MPS allocated: 18.10 GB, max allowed: 20.13 GB)); to train" in \
        capsys.readouterr().err

    def other(_):
        raise RuntimeError("something else")
    with pytest.raises(RuntimeError, match="something else"):
        cli.run("train_sft.py", other, lambda argv: None)


def test_an_explicit_gpu_under_torchrun_is_refused():
    from support import ddp
    with pytest.raises(ddp.DistributedError, match="--device cuda:1 under torchrun would put every process on"):
        ddp.device_name("cuda:1", ddp.World(0, 0, 2))
    assert ddp.device_name("cpu", ddp.World(0, 0, 2)) == "cpu" and ddp.device_name("cuda:1", ddp.World(0, 0, 1))
