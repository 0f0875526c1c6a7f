"""train_sft.py on the tiny model: learning, exact resume, frozen base, checkpoints and refusals."""

import json

import pytest
import torch

import lora
import phi2
import prompts
import train_sft
from prompts import DEFAULT_DATA
from support import training


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """80 bundled pairs: small enough for fast runs."""
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(DEFAULT_DATA.read_text().splitlines(keepends=True)[:80]))
    return path


def config(data, out, **kw):
    base = dict(model="tiny", data=str(data), run_dir=str(out), batch_size=4, grad_accum=2, max_len=256, lr=2e-3,
                warmup_steps=2, eval_interval=5, save_interval=5, val_fraction=0.15, dropout=0.1, rank=8)
    return train_sft.TrainConfig(**{**base, **kw})


def losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def test_training_lowers_validation_loss_and_leaves_the_base_alone(data, tmp_path):
    result = train_sft.main(config(data, tmp_path, max_steps=25))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert records[0]["step"] == 0 and val[-1] < val[0] - 0.1
    # only LoRA tensors differ from the base on disk, which is bit-identical
    trained = result["model"].state_dict()
    base = phi2.load_model(tmp_path / "base", dtype=result["model"].lm_head.weight.dtype).state_dict()
    for name, tensor in trained.items():
        if ".lora_" in name:
            continue
        assert torch.equal(tensor, base[name]), name
    modules = lora.lora_modules(result["model"]).values()
    assert any(not torch.equal(m.lora_B, torch.zeros_like(m.lora_B)) for m in modules)
    for folder in ("best", "last"):
        assert (tmp_path / folder / "adapter_model.safetensors").exists()
        assert json.loads((tmp_path / folder / "adapter_config.json").read_text())["r"] == 8
    assert json.loads((tmp_path / "train_config.json").read_text())["rank"] == 8


def test_resume_gives_the_losses_of_an_uninterrupted_run(data, tmp_path):
    straight = train_sft.main(config(data, tmp_path / "a", max_steps=12))
    train_sft.main(config(data, tmp_path / "b", max_steps=12, stop_after=7))
    assert max(losses(tmp_path / "b")) == 7
    resumed = train_sft.main(config(data, tmp_path / "b", max_steps=12, resume=True))
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    assert resumed["best_val_loss"] == straight["best_val_loss"]
    for name, m in lora.lora_modules(straight["model"]).items():
        assert torch.equal(m.lora_A, lora.lora_modules(resumed["model"])[name].lora_A), name


def test_divergence_stops_and_keeps_the_last_good_checkpoint(data, tmp_path):
    cfg = config(data, tmp_path, max_steps=10, save_interval=1, lr=1e6, grad_clip=1e9, warmup_steps=1,
                 precision="fp32")
    with pytest.raises(training.TrainingError,
                       match=r"training diverged at step \d+ .*; stopped, and the last good checkpoint"):
        train_sft.main(cfg)
    from safetensors import safe_open
    with safe_open(tmp_path / "state.safetensors", "pt") as f:
        assert int(f.metadata()["step"]) >= 1
    with safe_open(tmp_path / "last" / "adapter_model.safetensors", "pt") as f:
        assert all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_weight_after_the_optimizer_step_stops_training(bad, tmp_path):
    w = torch.nn.Parameter(torch.full((1000,), 1e20))  # large but finite: not a divergence by itself
    cfg = training.RunConfig(run_dir=str(tmp_path), device="cpu", precision="fp32", batch_size=1, grad_accum=1,
                             max_steps=5, log_interval=1, eval_interval=100, save_interval=100)
    run = training.Run.open(cfg, tmp_path / "out", None, script="train.py")
    plan = training.Plan(cfg, [prompts.Example([1, 2], [1, 2])] * 5)
    with training.Log(run, plan, 0, {}, {}) as log, pytest.raises(training.TrainingError,
                                                                  match="training diverged at step 2"):
        for step, value in enumerate((1.0, bad), 1):  # step 1 leaves a finite weight and goes through; 2 does not
            with torch.no_grad():
                w[417] = value
            log.add(step, torch.tensor(0.5), torch.tensor(0.0))  # a finite loss and gradient norm
            log.check({"w": w})


def test_refusals(data, tmp_path):
    with pytest.raises(training.TrainingError, match="use --model tiny to run offline"):
        train_sft.main(config(data, tmp_path / "x", model=str(tmp_path / "no-phi2")))
    with pytest.raises(training.TrainingError, match="nothing to resume"):
        train_sft.main(config(data, tmp_path / "y", resume=True))
    train_sft.main(config(data, tmp_path / "z", max_steps=2))
    with pytest.raises(training.TrainingError, match="already holds a run; continue it with --resume"):
        train_sft.main(config(data, tmp_path / "z", max_steps=2))
    with pytest.raises(training.TrainingError, match="was started with --rank 8, not 16"):
        train_sft.main(config(data, tmp_path / "z", max_steps=4, rank=16, resume=True))


def test_cli_parses_the_papers_settings():
    cfg = train_sft.parse_args(["--rank", "32", "--model", "tiny"])
    assert cfg.rank == 32 and cfg.alpha == 64.0 and cfg.lora_modules == lora.DEFAULT_MODULES and cfg.precision == "auto"


def test_a_pause_and_resume_leave_the_last_weights_in_out_when_validation_never_improves(data, tmp_path,
                                                                                       monkeypatch, capsys):
    """--stop-after writes the weights of the pause to --out as a stand-in; the resumed run's end replaces them."""
    from safetensors.torch import load_file

    from support import ddp
    worse = iter(range(1, 100))
    monkeypatch.setattr(ddp.World, "mean", lambda self, total, count, device: float(next(worse)))  # never better
    train_sft.main(config(data, tmp_path, max_steps=8, stop_after=3))
    err = capsys.readouterr().err
    assert "paused after step 3 of 8" in err and "continue with `python " in err and "--resume`" in err
    assert "try a lower --lr" not in err  # nothing to advise at a pause
    train_sft.main(config(data, tmp_path, max_steps=8, resume=True))
    assert "validation never improved" in capsys.readouterr().err
    out, last = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("best", "last"))
    assert out.keys() == last.keys() and all(torch.equal(out[k], last[k]) for k in out)


def test_without_validation_out_holds_the_final_weights_after_a_resume(data, tmp_path):
    cfg = dict(val_fraction=0.0, max_steps=4, save_interval=10)
    train_sft.main(config(data, tmp_path, stop_after=2, **cfg))
    train_sft.main(config(data, tmp_path, resume=True, **cfg))
    from safetensors.torch import load_file
    out, last = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("best", "last"))
    assert out.keys() == last.keys() and all(torch.equal(out[k], last[k]) for k in out)
    with pytest.raises(training.TrainingError, match="already at step 4, with nothing left to do"):
        train_sft.main(config(data, tmp_path, resume=True, **cfg))


def test_resume_refuses_an_auto_precision_that_resolves_differently(data, tmp_path, monkeypatch):
    from support import hardware
    monkeypatch.setattr(hardware, "cpu_bf16_native", lambda: False)
    monkeypatch.setattr(hardware, "BF16_MIN_WIDTH", 0)  # the tiny model as wide as one auto gives bf16 to
    train_sft.main(config(data, tmp_path, max_steps=3, stop_after=1, device="cpu"))
    monkeypatch.setattr(hardware, "cpu_bf16_native", lambda: True)  # the same run, resumed on an AMX machine
    with pytest.raises(training.TrainingError,
                       match="was trained in fp32 on cpu, but here --precision auto means bf16"):
        train_sft.main(config(data, tmp_path, max_steps=3, resume=True, device="cpu"))
