"""export.py: the stage-1 LoRA merged and the head folded into one plain Phi-2 folder, which transformers'
PhiForCausalLM loads to give our stack's logits (base + LoRA + head, fp32) and its greedy tokens."""

import json
import shutil

import pytest
import torch

import export
import head_adapter as ha
import phi2
from phi2.generation import generate
from tests.conftest import load_prompter, write_prompter


@pytest.fixture(scope="module")
def prompter(tiny_checkpoint, tmp_path_factory):
    """A stage-1 adapter and two heads, full (head-None) and rank 4 (head-4), with random non-trivial values."""
    return write_prompter(tiny_checkpoint, tmp_path_factory.mktemp("export"), targets=("head-None", "head-4"))


def ours(prompter, head_file):
    model, _, fp, stage1 = load_prompter(prompter / "lora", torch.float32)
    head = ha.load_head(head_file, model, fp, stage1) if head_file else None
    return model, head


@pytest.mark.parametrize("rank", [None, 4])
def test_transformers_on_the_export_gives_our_logits_and_tokens(prompter, tmp_path, rank):
    transformers = pytest.importorskip("transformers")
    head_file = prompter / f"head-{rank}.safetensors"
    out = export.main(export.parse_args(["--lora", str(prompter / "lora"), "--head", str(head_file), "--out",
                                         str(tmp_path / "x"), "--dtype", "fp32", "--shard-gb", "0.0004"]))
    index = json.loads((out / "model.safetensors.index.json").read_text())  # sharded as transformers shards
    assert len(set(index["weight_map"].values())) > 1 and (out / "tokenizer.json").exists()
    assert f"head-{rank}" in (out / "README.md").read_text()
    hf = transformers.PhiForCausalLM.from_pretrained(out).eval()
    model, head = ours(prompter, head_file)
    x = torch.randint(0, model.config.vocab_size, (2, 19))
    with torch.no_grad():
        expected = head(model.hidden_states(x))
        assert (hf(x).logits - expected).abs().max().item() <= 1e-4
        assert not torch.allclose(expected, model(x), atol=1e-2)  # the head changes the logits
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == phi2.load_tokenizer(out).eos_id  # transformers stops where we stop
    assert hf.generation_config.eos_token_id == config["eos_token_id"]
    prompt = x[0].tolist()
    ref = hf.generate(x[:1], attention_mask=torch.ones_like(x[:1]), max_new_tokens=24, do_sample=False,
                      eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert generate(model, [prompt], 24, head=head)[0].ids == ref


def test_a_second_head_is_refused_not_silently_taken(capsys):
    """One checkpoint per target: two --head flags (copied from generate.py's command) are refused."""
    with pytest.raises(SystemExit):
        export.parse_args(["--lora", "l", "--out", "o", "--head", "a.safetensors", "--head", "b.safetensors"])
    assert "--head given twice; this command takes one (run it once for each)" in capsys.readouterr().err


def test_no_head_exports_stage_one_and_refusals(prompter, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = export.main(export.parse_args(["--lora", str(prompter / "lora"), "--no-head", "--out", str(tmp_path / "s1")]))
    hf = transformers.PhiForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    model, _ = ours(prompter, None)
    x = torch.randint(0, model.config.vocab_size, (1, 11))
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max().item() <= 1e-4
    with pytest.raises(export.UsageError, match="exists; choose another folder, or pass --overwrite"):
        export.main(export.parse_args(["--lora", str(prompter / "lora"), "--no-head", "--out", str(out)]))
    with pytest.raises(export.UsageError, match="give --head FILE .* or --no-head"):
        export.parse_args(["--lora", str(prompter / "lora"), "--out", str(tmp_path / "y")])
    with pytest.raises(export.UsageError, match="--head and --no-head: give one of them"):
        export.parse_args(["--lora", str(prompter / "lora"), "--out", str(tmp_path / "y"), "--head", "a", "--no-head"])
    export.main(export.parse_args(["--lora", str(prompter / "lora"), "--no-head", "--out", str(out), "--overwrite"]))
    with pytest.raises(export.UsageError, match="did not write; --overwrite only replaces an earlier export"):
        export.main(export.parse_args(["--lora", str(prompter / "lora"), "--no-head", "--out", str(tmp_path),
                                       "--overwrite"]))
    with pytest.raises(export.UsageError, match="holds an input .* choose another folder"):
        export.main(export.parse_args(["--lora", str(prompter / "lora"), "--no-head", "--out", str(prompter),
                                       "--overwrite"]))
    (tmp_path / "file").write_text("x")
    with pytest.raises(export.UsageError, match="is a file"):
        export.main(export.parse_args(["--lora", str(prompter / "lora"), "--no-head", "--out", str(tmp_path / "file"),
                                       "--overwrite"]))
    assert (prompter / "lora" / "adapter_model.safetensors").exists()
    assert not list(tmp_path.glob(".*partial"))


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def test_overwrite_never_removes_a_folder_it_did_not_write(prompter, tmp_path):
    """The project's own checkout has a README starting '# phi2-prompter': --overwrite refuses it, untouched,
    as it refuses an export with anything added to it; an untouched earlier export is replaced."""
    args = ["--lora", str(prompter / "lora"), "--no-head", "--overwrite", "--out"]
    checkout = tmp_path / "checkout"
    (checkout / ".git" / "objects").mkdir(parents=True)
    (checkout / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (checkout / "README.md").write_text("# phi2-prompter\n\nLearned prompt optimisation on Phi-2.\n")
    (checkout / "notes.txt").write_text("uncommitted work\n")
    checkout_before = _tree(checkout)
    with pytest.raises(export.UsageError, match="did not write; --overwrite only replaces an earlier export") as e:
        export.main(export.parse_args([*args, str(checkout)]))
    assert "\n" not in str(e.value) and _tree(checkout) == checkout_before

    out = export.main(export.parse_args([*args, str(tmp_path / "x")]))
    marker = json.loads((out / export.MARKER).read_text())
    assert sorted(marker["files"]) == sorted(p.name for p in out.iterdir() if p.name != export.MARKER)
    export.main(export.parse_args([*args, str(out)]))  # an untouched earlier export: replaced
    assert json.loads((out / export.MARKER).read_text())["id"] != marker["id"]

    # an export with a file, a folder or a link added, or a marker copied into another folder: refused, untouched
    for extra in ("file", "folder", "link", "copied marker"):
        target = tmp_path / f"case-{extra.replace(' ', '-')}"
        if extra == "copied marker":
            shutil.copytree(checkout, target)
            shutil.copy(out / export.MARKER, target / export.MARKER)
        else:
            shutil.copytree(out, target)
            if extra == "file":
                (target / "mine.txt").write_text("keep me")
            elif extra == "folder":
                (target / "sub").mkdir()
            else:
                (target / "README.md").unlink()
                (target / "README.md").symlink_to(checkout / "notes.txt")
        before = _tree(target)
        with pytest.raises(export.UsageError, match="did not write"):
            export.main(export.parse_args([*args, str(target)]))
        assert _tree(target) == before, extra
    assert _tree(checkout) == checkout_before
    assert not list(tmp_path.glob(".*partial")) and not list(tmp_path.glob(".*old"))
