"""generate.py: inputs, outputs, streaming, resuming, and its one-line errors."""

import json

import pytest

import generate
import lora
import phi2
import support.prompter
from phi2.errors import UsageError
from phi2.generation import generate as engine
from prompts import DataError, format_prompt


def run(capsys, *argv):
    records = generate.main(generate.parse_args([str(a) for a in argv]))
    out = capsys.readouterr()
    return records, out.out, out.err


def test_single_prompt_streams_the_rewrite(tiny_checkpoint, capsys):
    records, out, _ = run(capsys, "--model", tiny_checkpoint, "--max-new-tokens", 12, "--precision", "fp32",
                          "Write a poem about rain")
    model, tok = phi2.load_model(tiny_checkpoint), phi2.load_tokenizer(tiny_checkpoint)
    ref = engine(model, [tok.encode(format_prompt("Write a poem about rain"))], 12, eos_id=tok.eos_id,
                 tokenizer=tok)[0]
    assert records[0]["output"] == ref.text.strip()
    assert out.strip() == ref.text.strip()


def test_file_to_json_keeps_input_order(tiny_checkpoint, tmp_path, capsys):
    prompts = ["Write a plan", "", "Explain a very long and detailed report about taxes in detail", "Draft"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    records, out, _ = run(capsys, "--model", tiny_checkpoint, "--file", tmp_path / "p.txt", "--json",
                          "--batch-size", 2, "--max-new-tokens", 8, "--precision", "fp32")
    lines = [json.loads(line) for line in out.splitlines()]
    assert [r["input"] for r in lines] == [p for p in prompts if p]  # the blank line is skipped
    assert [r["source"].rsplit(":", 1)[1] for r in lines] == ["1", "3", "4"]
    assert all(r["new_tokens"] == 8 and r["finish"] == "length" and r["tokens_per_s"] > 0 for r in lines)
    # batching (sorted by length) gives what each prompt gives alone
    for r in lines:
        alone, _, _ = run(capsys, "--model", tiny_checkpoint, "--max-new-tokens", 8, "--precision", "fp32", r["input"])
        assert alone[0]["output"] == r["output"]


def test_out_resumes_from_partial(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"q": f"Write a poem about {t}"}) + "\n"
                                              for t in ("rain", "taxes", "sorting")))
    argv = ["--model", tiny_checkpoint, "--file", tmp_path / "p.jsonl", "--field", "q", "--json",
            "--out", tmp_path / "out.jsonl", "--max-new-tokens", 6, "--precision", "fp32"]
    full, _, _ = run(capsys, *argv)
    final = (tmp_path / "out.jsonl").read_text().splitlines()
    assert len(final) == 3 and not (tmp_path / "out.jsonl.partial").exists()
    with pytest.raises(UsageError, match=r"out.jsonl exists \(an earlier run's results\); pass --overwrite"):
        run(capsys, *argv)  # a finished --out is not replaced in silence
    assert "wrote 3 rewrites to" in run(capsys, *argv, "--overwrite")[2]

    # a stopped run left two results (one cut short); the rerun computes only the rest
    (tmp_path / "out.jsonl").unlink()
    (tmp_path / "out.jsonl.partial").write_text(final[0] + "\n" + final[2] + "\n" + final[1][:20])
    calls = []
    monkeypatch.setattr(support.prompter, "generate", lambda model, prompts, *a, **k: calls.append(len(prompts))
                        or engine(model, prompts, *a, **k))
    resumed, _, err = run(capsys, *argv)
    assert calls == [1] and "resuming: 2 rewrites" in err
    assert [r["output"] for r in resumed] == [r["output"] for r in full]
    untimed = lambda lines: [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "tokens_per_s")}
                             for line in lines]
    assert untimed((tmp_path / "out.jsonl").read_text().splitlines()) == untimed(final)

    # a stopped run under other settings is not mixed in
    header = json.dumps({"settings": {**generate.settings(generate.parse_args([str(a) for a in argv])),
                                      "max_new_tokens": 9}})
    (tmp_path / "out.jsonl").unlink()
    (tmp_path / "out.jsonl.partial").write_text(header + "\n" + final[0] + "\n")
    with pytest.raises(UsageError, match=r"out.jsonl.partial: results made with other settings \(max_new_tokens "
                                         r"changed\)"):
        run(capsys, *argv)


def test_partial_from_other_prompts_is_refused(tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "out.txt.partial").write_text(json.dumps({"index": 0, "input": "something else"}) + "\n")
    with pytest.raises(UsageError, match=r"out.txt.partial:1: results for other prompts"):
        run(capsys, "--model", tiny_checkpoint, "--out", tmp_path / "out.txt", "Write a plan")


def test_raw_continues_the_text(tiny_checkpoint, capsys):
    records, _, _ = run(capsys, "--model", tiny_checkpoint, "--raw", "--max-new-tokens", 5, "--precision", "fp32",
                        "Write a poem")
    model, tok = phi2.load_model(tiny_checkpoint), phi2.load_tokenizer(tiny_checkpoint)
    assert records[0]["output"] == engine(model, [tok.encode("Write a poem")], 5, eos_id=tok.eos_id,
                                          tokenizer=tok)[0].text
    assert records[0]["prompt_tokens"] == len(tok.encode("Write a poem"))


def test_prompt_longer_than_context_is_skipped_with_a_warning(tiny_checkpoint, capsys):
    long = " ".join(["Explain a report about taxes in detail"] * 20)
    records, _, err = run(capsys, "--model", tiny_checkpoint, "--max-new-tokens", 4, long, "Draft a plan")
    assert "argument 1:" in err and "fill the context of 96; skipped (shorten the prompt)" in err
    assert [r["input"] for r in records] == ["Draft a plan"]


def test_errors_are_one_line(tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(phi2.CheckpointError, match="no Phi-2 checkpoint here; download it with `huggingface-cli"):
        run(capsys, "--model", tmp_path / "missing", "hello")
    with pytest.raises(UsageError, match="argument 2 is an empty prompt"):
        run(capsys, "--model", tiny_checkpoint, "hello", "  ")
    (tmp_path / "p.jsonl").write_text('{"text": "hi"}\n')
    with pytest.raises(DataError, match=r"p.jsonl:1: no prompt in field 'prompt' \(fields: text\)"):
        run(capsys, "--model", tiny_checkpoint, "--file", tmp_path / "p.jsonl")


def test_cli_exits_with_one_line(tiny_checkpoint, tmp_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "generate.py", "--model", str(tmp_path / "nope"), "hi"],
                       capture_output=True, text=True, cwd=generate.__file__.rsplit("/", 1)[0])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("generate.py: error:")


def test_compile_gives_the_eager_rewrites_and_says_what_compiling_cost(tiny_checkpoint, capsys, monkeypatch):

    import phi2.generation as gen
    # inductor is what --compile uses; aot_eager runs the same static-cache graph without minutes of compiling
    monkeypatch.setattr(generate, "compiled", lambda: gen.compiled("aot_eager"))
    argv = ["--model", tiny_checkpoint, "--max-new-tokens", 10, "--precision", "fp32", "--json", "Write a plan",
            "Explain taxes to a child"]
    eager, _, _ = run(capsys, *argv)
    compiled, _, err = run(capsys, *argv, "--compile")
    assert [r["output"] for r in compiled] == [r["output"] for r in eager]
    assert "compiling the decode step took" in err


def test_a_wrong_lora_path_says_what_it_is(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """Each --lora mistake names what was given and what to pass instead."""
    model = phi2.load_model(tiny_checkpoint)
    lora.inject(model, rank=2, alpha=4.0)
    lora.save_adapter(model, tmp_path / "adapter", base_path=str(tmp_path / "moved-away"))
    (tmp_path / "head.safetensors").write_bytes(b"")
    for given, message in ((tmp_path / "sft" / "bst", "bst: no such folder"),
                           (tmp_path / "head.safetensors", r"head.safetensors: a file, a stage-2 head perhaps "
                                                            r"\(--head\)"),
                           (tiny_checkpoint, r"adapter_config.json: a model folder \(a base, or export.py's merged "
                                             r"model\), not an adapter: pass it as --model"),
                           (tmp_path / "adapter", r"adapter: its base, .*moved-away \(recorded in its "
                                                  r"adapter_config.json\), is not there; pass --model")):
        with pytest.raises(UsageError, match=message):
            run(capsys, "--lora", given, "hello")
    monkeypatch.chdir(tmp_path)  # no checkpoints/phi-2 here
    with pytest.raises(UsageError, match="a --head goes with the --lora it was trained on, which names its base"):
        run(capsys, "--head", tmp_path / "head.safetensors", "hello")
