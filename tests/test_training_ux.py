"""What a person sees of a training run: the validation lines and the summary, curves.svg, TensorBoard and W&B
(read back with their own readers), and `--run-dir X --resume` with nothing else."""

import json
import sys
import xml.etree.ElementTree as ET

import pytest

import train_head
import train_sft
from prompts import DATA_DIR, DEFAULT_DATA
from support import training


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(DEFAULT_DATA.read_text().splitlines(keepends=True)[:48]))
    return path


def argv(data, run_dir, *more):
    return ["--model", "tiny", "--data", str(data), "--run-dir", str(run_dir), "--batch-size", "4", "--grad-accum",
            "1", "--rank", "4", "--max-steps", "8", "--eval-interval", "2", "--save-interval", "2",
            "--log-interval", "1", "--lr", "2e-3", "--warmup-steps", "1", "--max-len", "256", "--device", "cpu",
            "--precision", "fp32", *more]


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_run_says_each_validation_and_sums_up_with_paths_that_exist(data, tmp_path, capsys):
    train_sft.main(train_sft.parse_args(argv(data, tmp_path)))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "validation loss" in line and line.startswith("step ")]
    assert [line.split(":")[0] for line in lines] == ["step 0", "step 2", "step 4", "step 6", "step 8"]
    assert "train loss" in lines[1] and ("best so far" in lines[1] or "(best " in lines[1])
    summary = err[err.index("done: step 8 of 8"):]
    best = summary.split("best:  ")[1].split("\n")[0]
    last = summary.split("last:  ")[1].split("\n")[0]
    assert (tmp_path / "best").samefile(best) and (tmp_path / "last").samefile(last)
    assert "tokens/s" in summary and "best validation loss" in summary or "never improved" in summary


def test_curves_svg_draws_every_logged_step(data, tmp_path):
    train_sft.main(train_sft.parse_args(argv(data, tmp_path, "--max-steps", "6")))
    svg = ET.parse(tmp_path / "curves.svg").getroot()
    points = [(c.get("data-series"), int(c.get("data-x")), float(c.get("data-y")))
              for c in svg.iter("{http://www.w3.org/2000/svg}circle")]
    log = records(tmp_path)
    assert [(x, y) for s, x, y in points if s == "train loss"] == [(r["step"], r["loss"]) for r in log if "loss" in r]
    assert [(x, y) for s, x, y in points if s == "validation loss"] == \
           [(r["step"], r["val_loss"]) for r in log if "val_loss" in r]


def test_run_dir_and_resume_alone_continue_exactly_and_a_changed_setting_is_refused(data, tmp_path):
    train_sft.main(train_sft.parse_args(argv(data, tmp_path / "straight")))
    train_sft.main(train_sft.parse_args(argv(data, tmp_path / "stopped", "--stop-after", "3")))
    with pytest.raises(training.TrainingError, match=r"was started with --lr 0.002, not 0.01; --rank 4, not 8"):
        train_sft.main(train_sft.parse_args(["--run-dir", str(tmp_path / "stopped"), "--resume", "--lr", "0.01",
                                             "--rank", "8"]))
    train_sft.main(train_sft.parse_args(["--run-dir", str(tmp_path / "stopped"), "--resume"]))
    untimed = lambda run: [{k: v for k, v in r.items() if k not in ("seconds", "tokens_per_s")} for r in records(run)]
    assert untimed(tmp_path / "stopped") == untimed(tmp_path / "straight")
    # a setting that may change (how long it runs) is taken from the command line, and kept for the next resume
    train_sft.main(train_sft.parse_args(["--run-dir", str(tmp_path / "stopped"), "--resume", "--max-steps", "12",
                                         "--stop-after", "10"]))
    assert max(r["step"] for r in records(tmp_path / "stopped")) == 10
    train_sft.main(train_sft.parse_args(["--run-dir", str(tmp_path / "stopped"), "--resume"]))
    assert max(r["step"] for r in records(tmp_path / "stopped")) == 12


def test_a_run_resumes_from_another_folder_and_a_second_trainer_on_it_is_refused(data, tmp_path, monkeypatch):
    """Paths are saved absolute: `--run-dir X --resume` works from anywhere, and a data path given another way
    is the same file. A folder another process trains in is refused."""
    import subprocess
    monkeypatch.chdir(data.parent)
    relative = ["--data", data.name, "--run-dir", "run"]
    train_sft.main(train_sft.parse_args([*argv(data, "run", "--stop-after", "2"), *relative]))
    saved = json.loads((data.parent / "run" / "train_config.json").read_text())
    assert saved["data"] == str(data) and saved["run_dir"] == str(data.parent / "run")
    monkeypatch.chdir(tmp_path)
    train_sft.main(train_sft.parse_args(["--run-dir", str(data.parent / "run"), "--resume", "--stop-after", "4",
                                         "--data", str(data)]))
    assert max(r["step"] for r in records(data.parent / "run")) == 4
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; f = open(sys.argv[1], 'a+'); "
                               "fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB); f.seek(0); f.truncate(); "
                               "f.write(f'{os.getpid()}\\n'); f.flush(); print('held', flush=True); time.sleep(60)",
                               str(data.parent / "run" / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"  # (it fails at once if this process still held the lock)
        in_use = rf"run is in use by another training process \(pid {holder.pid}\); wait for it"
        with pytest.raises(training.TrainingError, match=in_use):
            train_sft.main(train_sft.parse_args(["--run-dir", str(data.parent / "run"), "--resume"]))
    finally:
        holder.kill()
        holder.wait()
    train_sft.main(train_sft.parse_args(["--run-dir", str(data.parent / "run"), "--resume"]))  # free again
    assert max(r["step"] for r in records(data.parent / "run")) == 8


def test_ctrl_c_asks_once_a_second_stops_at_once_and_a_sigterm_after_it_asks_nothing_more(capsys):
    import os
    import signal
    import types
    run = types.SimpleNamespace(world=types.SimpleNamespace(size=1))
    for first, then in ((signal.SIGINT, signal.SIGINT), (signal.SIGTERM, signal.SIGINT), (signal.SIGINT, None)):
        with training.StopSignals(run) as signals:
            os.kill(os.getpid(), first)
            assert signals.stop()
            os.kill(os.getpid(), signal.SIGTERM)  # a SIGTERM after it: nothing new
            if then is not None:
                with pytest.raises(KeyboardInterrupt):
                    os.kill(os.getpid(), then)
        assert capsys.readouterr().err.count("stopping after this step") == 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_head_runs_resume_from_their_folder_alone(tmp_path):
    data = DATA_DIR / "targets" / "concise.jsonl"
    sft = tmp_path / "sft"
    train_sft.main(train_sft.parse_args(argv(DEFAULT_DATA, sft, "--max-steps", "2")))
    common = ["--target", "concise", "--data", str(data), "--lora", str(sft / "best"), "--out",
              str(tmp_path / "h.safetensors"), "--run-dir", str(tmp_path / "head"), "--max-steps", "4",
              "--batch-size", "8", "--grad-accum", "1", "--max-len", "256"]
    train_head.main(train_head.parse_args([*common, "--stop-after", "2"]))
    result = train_head.main(train_head.parse_args(["--run-dir", str(tmp_path / "head"), "--resume"]))
    assert result["step"] == 4


def _tensorboard_scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_gets_the_scalars_at_their_steps_across_a_resume(data, tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    train_sft.main(train_sft.parse_args(argv(data, run, "--report-to", "tensorboard", "--stop-after", "5")))
    train_sft.main(train_sft.parse_args(["--run-dir", str(run), "--resume"]))
    scalars = _tensorboard_scalars(run / "tensorboard")
    log = records(run)
    train = [(r["step"], r["loss"]) for r in log if "loss" in r]
    # each step once (the run stopped after 5, checkpointed at 4 and 5, and went on from 5), at the log's values
    assert [s for s, _ in scalars["train/loss"]] == [s for s, _ in train] == list(range(1, 9))
    assert all(abs(a - b) < 1e-6 for (_, a), (_, b) in zip(scalars["train/loss"], train))
    assert [s for s, _ in scalars["val/loss"]] == [r["step"] for r in log if "val_loss" in r]
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s"} <= set(scalars)


def _wandb_history(run_file):
    """The history records of an offline W&B run file: LevelDB log blocks of the run's protobuf records."""
    from wandb.proto import wandb_internal_pb2
    data, pos, chunks, history = run_file.read_bytes(), 7, b"", []  # 7: W&B's own file header
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:  # a block's tail too short for a record header is padding
            pos += room
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or a record's last part
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            if record.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                history.append(items)
    return history


def test_wandb_offline_holds_the_history_and_a_resume_continues_the_same_run(data, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    train_sft.main(train_sft.parse_args(argv(data, run, "--report-to", "wandb", "--stop-after", "4")))
    run_id = (run / "wandb_id").read_text().strip()
    train_sft.main(train_sft.parse_args(["--run-dir", str(run), "--resume"]))
    files = sorted((run / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2, files  # the first run and its resumption, under one id
    steps = [h.get("_step") for f in files for h in _wandb_history(f) if "train/loss" in h]
    assert steps == list(range(1, 9))


def test_a_missing_reporter_is_one_line(data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(training.TrainingError, match=r"needs tensorboard: pip install -e '\.\[tensorboard\]'"):
        train_sft.main(train_sft.parse_args(argv(data, tmp_path, "--report-to", "tensorboard")))


def test_a_resume_after_a_crash_that_cut_the_log_mid_line_goes_on(data, tmp_path):
    train_sft.main(train_sft.parse_args(argv(data, tmp_path, "--stop-after", "4")))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "epoch": 0, "lr": 0.0')  # the crash came while step 5's record was being written
    train_sft.main(train_sft.parse_args(["--run-dir", str(tmp_path), "--resume"]))
    assert [r["step"] for r in records(tmp_path) if "loss" in r] == list(range(1, 9))


def test_a_signal_during_the_last_validation_lets_the_run_finish(data, tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM asks the loop to stop after its step: during the last step's validation, that is the
    end, so the validation, the best adapter and the summary all happen, and nothing is left to resume."""
    import os
    import signal

    import torch

    import phi2.model
    loss, calls = phi2.model.Phi2.loss, []

    def counting(self, *args):
        if not torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == last_validation_first_batch:
                os.kill(os.getpid(), signal.SIGTERM)
        return loss(self, *args)

    # 8 steps, validations at 0, 2, 4, 6 and 8 over 5 validation examples in batches of 4: 2 batches each
    last_validation_first_batch = 4 * 2 + 1
    monkeypatch.setattr(phi2.model.Phi2, "loss", counting)
    result = train_sft.main(train_sft.parse_args(argv(data, tmp_path)))
    assert result["step"] == 8 and len(calls) == 10  # the last validation ran whole
    assert [r["step"] for r in records(tmp_path) if "val_loss" in r] == [0, 2, 4, 6, 8]
    assert (tmp_path / "best" / "adapter_model.safetensors").exists()
    with pytest.raises(training.TrainingError, match="already at step 8, with nothing left to do up to 8; the run is "
                                                     "finished; raise --max-steps or --epochs"):
        train_sft.main(train_sft.parse_args(["--run-dir", str(tmp_path), "--resume"]))


def test_a_forced_stop_names_the_command_that_continues(data, tmp_path, monkeypatch, capsys):
    """A KeyboardInterrupt that gets past the trainer's own handling (a second Ctrl-C) still says how to go on:
    the command that resumes, once a checkpoint exists, else the first command again."""
    import phi2
    from support import cli
    loss, stop_once = phi2.model.Phi2.loss, {"saved": False}

    def interrupted(*args, **kwargs):
        if (tmp_path / "run" / "state.safetensors").exists() == stop_once["saved"]:
            raise KeyboardInterrupt
        return loss(*args, **kwargs)
    monkeypatch.setattr(phi2.model.Phi2, "loss", interrupted)
    for saved, said in ((False, "there was no checkpoint yet: run the same command again"),
                        (True, "the last checkpoint is kept: continue with `python train_sft.py --run-dir "
                               f"{tmp_path / 'run'} --resume`")):
        stop_once["saved"] = saved
        with pytest.raises(SystemExit) as stopped:
            cli.run("train_sft.py", train_sft.main, train_sft.parse_args, argv(data, tmp_path / "run"),
                    on_interrupt=training.on_interrupt)
        assert stopped.value.code == 130 and f"train_sft.py: interrupted; {said}" in capsys.readouterr().err


def test_a_forced_stop_of_stage_2_before_its_checkpoint_asks_for_overwrite(tmp_path, monkeypatch, capsys):
    """Stage 2 writes --out at step 0: run again, the same command needs --overwrite, and the message says so."""
    import head_adapter
    from support import cli
    sft = tmp_path / "sft"
    train_sft.main(train_sft.parse_args(argv(DEFAULT_DATA, sft, "--max-steps", "2")))
    loss = head_adapter.HeadAdapter.loss

    def interrupted(self, *args):
        if (tmp_path / "h.safetensors").exists():  # after step 0's validation wrote it
            raise KeyboardInterrupt
        return loss(self, *args)
    monkeypatch.setattr(head_adapter.HeadAdapter, "loss", interrupted)
    with pytest.raises(SystemExit):
        cli.run("train_head.py", train_head.main, train_head.parse_args,
                ["--target", "concise", "--data", str(DATA_DIR / "targets" / "concise.jsonl"), "--lora",
                 str(sft / "best"), "--out", str(tmp_path / "h.safetensors"), "--run-dir", str(tmp_path / "head"),
                 "--max-steps", "4", "--batch-size", "8", "--grad-accum", "1", "--max-len", "256"],
                on_interrupt=training.on_interrupt)
    assert (f"there was no checkpoint yet: run the same command again, with --overwrite ({tmp_path / 'h.safetensors'} "
            "was written already)") in capsys.readouterr().err


def test_a_step_the_fp16_scaler_skips_is_logged_as_strict_json(data, tmp_path, monkeypatch):
    """Its gradient norm is infinite: metrics.jsonl says null (NaN and Infinity are not JSON), and the run goes on."""
    import torch
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: torch.tensor(float("inf")))
    train_sft.main(train_sft.parse_args([*argv(data, tmp_path), "--precision", "fp16", "--max-steps", "2"]))

    def strict(constant):
        raise ValueError(f"{constant} in metrics.jsonl")
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    steps = [r for r in (json.loads(line, parse_constant=strict) for line in lines) if "loss" in r]
    assert len(steps) == 2 and all(r["grad_norm"] is None for r in steps)
