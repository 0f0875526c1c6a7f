"""Stage 2: the head adapter (identity init, files, refusals) and train_head.py (cache, resume, frozen body)."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import head_adapter as ha
import phi2
import train_head
import train_sft
from phi2.generation import generate
from phi2.weights import fingerprint
from prompts import DATA_DIR, DEFAULT_DATA
from support import training
from tests.conftest import load_prompter

ROOT = Path(__file__).resolve().parents[1]
CONCISE = DATA_DIR / "targets" / "concise.jsonl"


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """A tiny base (runs/sft/base) and a short stage-1 adapter (runs/sft/best)."""
    out = tmp_path_factory.mktemp("sft")
    data = out / "pairs.jsonl"
    data.write_text("".join(DEFAULT_DATA.read_text().splitlines(keepends=True)[:60]))
    train_sft.main(train_sft.TrainConfig(model="tiny", data=str(data), run_dir=str(out), max_steps=4, batch_size=4,
                                         grad_accum=1, rank=4, lr=5e-3, warmup_steps=1, eval_interval=4))
    return out / "base", out / "best"


def head_config(stage1, tmp_path, **kw):
    base = dict(target="concise", data=str(CONCISE), lora=str(stage1[1]), out=str(tmp_path / "concise.safetensors"),
                run_dir=str(tmp_path / "run"), batch_size=8, grad_accum=1, lr=3e-3, warmup_steps=2, max_steps=12,
                eval_interval=4, save_interval=4, max_len=256)
    return train_head.HeadConfig(**{**base, **kw})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank", [None, 4])
@torch.no_grad()
def test_identity_init_gives_the_base_logits_exactly(tiny_cfg, dtype, rank):
    model = phi2.build_model(tiny_cfg, dtype=dtype).eval()
    x = torch.randint(0, tiny_cfg.vocab_size, (2, 11))
    base = model(x)
    head = ha.HeadAdapter(model.lm_head, rank, dtype=dtype)
    assert torch.equal(head(model.hidden_states(x)), base)  # the head composes after the final hidden state
    prompt = x[0].tolist()
    assert generate(model, [prompt], 12, head=head)[0].ids == generate(model, [prompt], 12)[0].ids


def test_train_head_changes_only_the_head(stage1, tmp_path):
    result = train_head.main(head_config(stage1, tmp_path))
    assert not torch.is_autocast_enabled("cpu")  # no autocast state leaks out of a run
    model, head = result["model"], result["head"]
    # the frozen body: base with the stage-1 adapter merged, exactly as loaded
    reference, *_ = load_prompter(stage1[1], model.lm_head.weight.dtype)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert not torch.equal(head.adapter.weight, torch.eye(head.adapter.weight.size(0)))
    assert not torch.equal(head.lm_head.weight, reference.lm_head.weight.float())
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in log if "val_loss" in r]
    assert min(val[1:]) < val[0]  # the head learns the target's style


def test_head_file_round_trip_and_metadata(stage1, tmp_path):
    result = train_head.main(head_config(stage1, tmp_path, max_steps=4))
    metadata = ha.read_metadata(tmp_path / "concise.safetensors")
    model, _, base_fp, stage1_id = load_prompter(stage1[1], torch.float32)
    assert metadata["target"] == "concise" and metadata["base_fingerprint"] == base_fp
    assert metadata["stage1_adapter"] == stage1_id == ha.stage1_id(stage1[1])
    assert metadata["hidden_size"] == str(model.config.n_embd) and metadata["head_rank"] == "full"
    assert json.loads(metadata["base_config"])["n_embd"] == model.config.n_embd
    head = ha.load_head(tmp_path / "concise.safetensors", model, base_fp, stage1_id)
    assert head.target == "concise"
    # the file holds only the head's tensors
    from safetensors import safe_open
    with safe_open(tmp_path / "concise.safetensors", "pt") as f:
        assert sorted(f.keys()) == ["head_adapter.adapter.bias", "head_adapter.adapter.weight",
                                    "head_adapter.lm_head.bias", "head_adapter.lm_head.weight"]
    x = torch.randint(0, model.config.vocab_size, (1, 9))
    h = model.hidden_states(x)
    trained = ha.load_head(tmp_path / "run" / "last.safetensors", model, base_fp, stage1_id)
    with torch.no_grad():
        torch.testing.assert_close(trained(h), result["head"].float()(h), atol=1e-5, rtol=0)


def test_out_keeps_the_identity_head_when_validation_never_improves(stage1, tmp_path, monkeypatch, capsys):
    """Stage 2 writes --out at step 0; a run that never beats it leaves the identity there, and says so."""
    from safetensors.torch import load_file

    from support import ddp
    worse = iter(range(1, 100))
    monkeypatch.setattr(ddp.World, "mean", lambda self, total, count, device: float(next(worse)))  # never better
    train_head.main(head_config(stage1, tmp_path, max_steps=4))
    assert "the best artefact is the step-0 head, the base's own (the identity)" in capsys.readouterr().err
    out, last = (load_file(p) for p in (tmp_path / "concise.safetensors", tmp_path / "run" / "last.safetensors"))
    weight = out["head_adapter.adapter.weight"]
    assert torch.equal(weight, torch.eye(len(weight))) and not out["head_adapter.adapter.bias"].any()
    assert not torch.equal(last["head_adapter.adapter.weight"], weight)


def test_low_rank_head_file_is_small(stage1, tmp_path):
    train_head.main(head_config(stage1, tmp_path / "full", max_steps=2))
    train_head.main(head_config(stage1, tmp_path / "low", max_steps=2, head_rank=4,
                                run_dir=str(tmp_path / "low" / "run"),
                                out=str(tmp_path / "low" / "h.safetensors")))
    full = (tmp_path / "full" / "concise.safetensors").stat().st_size
    low = (tmp_path / "low" / "h.safetensors").stat().st_size
    assert low < full / 2
    model, _, base_fp, stage1_id = load_prompter(stage1[1], torch.float32)
    head = ha.load_head(tmp_path / "low" / "h.safetensors", model, base_fp, stage1_id)
    assert head.head_rank == 4 and head.lm_head.weight is model.lm_head.weight  # shares the base head


@pytest.mark.parametrize("precision, steps, tol", [
    ("bf16", 5, 0.0),  # within the first epoch (13 steps): the same computations, bit for bit
    ("fp32", 30, 1e-6),  # later epochs recompute each example in other batches: equal up to rounding
])
def test_cached_and_recomputed_features_give_the_same_head(stage1, tmp_path, precision, steps, tol):
    heads = [train_head.main(head_config(stage1, tmp_path / d, run_dir=str(tmp_path / d / "run"), max_steps=steps,
                                         precision=precision, no_cache=no_cache))["head"]
             for d, no_cache in (("cached", False), ("plain", True))]
    for (name, a), (_, b) in zip(heads[0].named_parameters(), heads[1].named_parameters()):
        torch.testing.assert_close(a, b, atol=tol, rtol=0, msg=name)
    assert not torch.equal(heads[0].lm_head.bias, torch.zeros_like(heads[0].lm_head.bias))


def test_train_head_resumes_exactly_after_sigkill(stage1, tmp_path):
    straight = train_head.main(head_config(stage1, tmp_path / "a", run_dir=str(tmp_path / "a" / "run")))
    # a real train_head.py that SIGKILLs itself after step 7 (checkpoints at 4 and 8), on as many threads
    cfg = head_config(stage1, tmp_path / "b", run_dir=str(tmp_path / "b" / "run"))
    argv = [sys.executable, "tests/kill_at_step.py", "7", "train_head.py", "--target", cfg.target, "--data",
            cfg.data, "--lora", cfg.lora, "--out",
            cfg.out, "--run-dir", cfg.run_dir, "--batch-size", "8", "--grad-accum", "1", "--lr", "3e-3",
            "--warmup-steps", "2", "--max-steps", "12", "--eval-interval", "4", "--save-interval", "4",
            "--max-len", "256"]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    killed = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = train_head.main(head_config(stage1, tmp_path / "b", run_dir=str(tmp_path / "b" / "run"), resume=True))
    losses = lambda d: [r["loss"] for r in map(json.loads, (d / "run" / "metrics.jsonl").read_text().splitlines())
                        if "loss" in r]
    assert losses(tmp_path / "a") == losses(tmp_path / "b") and len(losses(tmp_path / "a")) == 12
    for (name, a), (_, b) in zip(straight["head"].named_parameters(), resumed["head"].named_parameters()):
        assert torch.equal(a, b), name


def test_mismatched_heads_are_refused(stage1, tmp_path, tiny_cfg):
    train_head.main(head_config(stage1, tmp_path, max_steps=1))
    path = tmp_path / "concise.safetensors"
    model, _, base_fp, stage1_id = load_prompter(stage1[1], torch.float32)
    with pytest.raises(ha.HeadError, match="made for another base model"):
        ha.load_head(path, model, fingerprint(phi2.build_model(tiny_cfg)), stage1_id)
    where = re.escape(str(stage1[1].resolve()))
    with pytest.raises(ha.HeadError, match=rf"trained on stage-1 adapter .* pass the --lora it was trained with "
                                           rf"\(it was then at '{where}'; if that folder was trained again"):
        ha.load_head(path, model, base_fp, "none")
    (tmp_path / "notes.safetensors").write_bytes(b"plain text, not safetensors")
    with pytest.raises(ha.HeadError, match="not a safetensors file"):
        ha.load_head(tmp_path / "notes.safetensors", model, base_fp, stage1_id)
    with pytest.raises(ha.HeadError, match="not a head adapter"):
        ha.load_head(stage1[1] / "adapter_model.safetensors", model, base_fp, stage1_id)
    with pytest.raises(ha.HeadError, match="no such head file"):
        ha.load_head(tmp_path / "missing.safetensors", model, base_fp, stage1_id)


def test_generate_cli_gives_one_rewrite_per_head(stage1, tmp_path, capsys):
    import generate
    for target in ("concise", "other"):
        train_head.main(head_config(stage1, tmp_path / target, target=target, run_dir=str(tmp_path / target / "run"),
                                    out=str(tmp_path / f"{target}.safetensors"), max_steps=3))
    records = generate.main(generate.parse_args([
        "--lora", str(stage1[1]), "--head", str(tmp_path / "concise.safetensors"), "--head",
        str(tmp_path / "other.safetensors"), "--max-new-tokens", "6", "--precision", "fp32", "--json",
        "write a poem", "explain taxes"]))
    out = capsys.readouterr().out.splitlines()
    assert [(r["input"], r["target"]) for r in map(json.loads, out)] == [
        ("write a poem", "concise"), ("write a poem", "other"), ("explain taxes", "concise"),
        ("explain taxes", "other")]
    assert len(records) == 4


def test_a_head_is_trained_on_one_target_and_not_named_base(stage1, tmp_path, capsys):
    mixed = tmp_path / "mixed.jsonl"
    lines = CONCISE.read_text().splitlines()[:20]
    records = [{**json.loads(line), "target": "model-a" if i < 10 else "model-b"} for i, line in enumerate(lines)]
    mixed.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(training.TrainingError, match=r"several targets \('model-a' at line 1, 'model-b' at line 11\)"):
        train_head.main(head_config(stage1, tmp_path, data=str(mixed)))
    with pytest.raises(training.TrainingError, match="--target base: serve.py gives that name to stage 1 alone"):
        head_config(stage1, tmp_path, target="base")
    renamed = tmp_path / "renamed.jsonl"  # pairs whose rewrite field is called "target": no target names there
    renamed.write_text("".join(json.dumps({"source": r["prompt"], "target": r["improved"]}) + "\n" for r in records))
    train_head.main(head_config(stage1, tmp_path / "r", data=str(renamed), prompt_field="source",
                                improved_field="target", max_steps=1))
    one = tmp_path / "one.jsonl"
    one.write_text("".join(json.dumps({**r, "target": "model-a"}) + "\n" for r in records))
    train_head.main(head_config(stage1, tmp_path, data=str(one), max_steps=1))
    assert "stage 2, target concise (its pairs made by model-a):" in capsys.readouterr().err
