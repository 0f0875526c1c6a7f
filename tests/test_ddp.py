"""Both trainers under torchrun: 2 CPU processes (gloo, on 127.0.0.1) against 1 process of the same global batch.

The one-process runs are in-process calls of main(); the two-process ones are real `torchrun` jobs. With
fp32 and no dropout, a step's gradient differs only in the order its micro-batches' parts are summed: the
losses agree to 1e-7 relative (6e-8 seen) and the trained tensors to 3e-6 absolute (AdamW divides each
gradient by its own running size, so where a gradient is near zero a rounding-sized difference in it moves
the weight by a visible fraction of the learning rate).
"""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_head
import train_sft
from prompts import DEFAULT_DATA
from support import training

ROOT = Path(__file__).resolve().parents[1]
LOSSES = dict(rtol=1e-6, atol=0.0)
TENSORS = dict(rtol=0.0, atol=1e-5)
# 38 pairs: 4 for validation, 34 to train on; a global batch of 8 leaves a last step of 2 examples, one
# micro-batch, so that the second process has none and joins the all-reduce with a stand-in
COMMON = ["--batch-size", "2", "--max-len", "256", "--val-fraction", "0.1", "--epochs", "2", "--warmup-steps", "2",
          "--eval-interval", "4", "--save-interval", "3", "--log-interval", "1", "--device", "cpu",
          "--precision", "fp32"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, args, nproc=2, env=None, check=True, kill_at=None):
    """script under torchrun; kill_at: its last process dies by SIGKILL after that step (tests/kill_at_step.py)."""
    wrapped = [script] if kill_at is None else ["tests/kill_at_step.py", str(kill_at), script]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), *wrapped, *args]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def log(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(one, two, exact=False):
    """The same steps with the same examples, and losses equal (to rounding)."""
    a, b = log(one), log(two)
    assert [(r["step"], r.get("tokens"), r.get("targets")) for r in a] == \
           [(r["step"], r.get("tokens"), r.get("targets")) for r in b]
    for key in ("loss", "val_loss"):
        x, y = [r.get(key, 0.0) for r in a], [r.get(key, 0.0) for r in b]
        if exact:
            assert x == y, key
        else:
            torch.testing.assert_close(torch.tensor(x), torch.tensor(y), **LOSSES, msg=key)


def assert_same_tensors(path_a, path_b):
    a, b = load_file(path_a), load_file(path_b)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], **TENSORS, msg=name)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """The data, and a one-process stage-1 run (batch 2 x grad-accum 4 = global batch 8) with its tiny base."""
    folder = tmp_path_factory.mktemp("ddp")
    data = folder / "pairs.jsonl"
    data.write_text("".join(DEFAULT_DATA.read_text().splitlines(keepends=True)[:38]))
    args = ["--model", "tiny", "--data", str(data), "--run-dir", str(folder / "one"), "--rank", "4",
            "--dropout", "0", "--lr", "2e-3", *COMMON]
    train_sft.main(train_sft.parse_args([*args, "--grad-accum", "4"]))
    return folder, data


def test_two_processes_train_stage1_as_one_does(stage1):
    folder, data = stage1
    result = torchrun("train_sft.py", ["--model", str(folder / "one" / "base"), "--data", str(data), "--run-dir",
                                       str(folder / "two"), "--rank", "4", "--dropout", "0", "--lr", "2e-3", *COMMON,
                                       "--grad-accum", "2"])
    assert result.stderr.splitlines()[0].endswith("batch 2 x grad-accum 2 x 2 processes = global batch 8")
    assert_same_run(folder / "one", folder / "two")
    for name in ("best", "last"):
        assert_same_tensors(folder / "one" / name / "adapter_model.safetensors",
                            folder / "two" / name / "adapter_model.safetensors")
    # rank 0 alone wrote: each step logged once, no file the one-process run lacks, no temporary left
    assert [r["step"] for r in log(folder / "two")] == [0, *range(1, 11)]
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.name != "base" and "base" not in p.parts)
    assert files(folder / "two") == files(folder / "one")
    assert json.loads((folder / "two" / "train_config.json").read_text())["processes"] == 2


def test_a_killed_two_process_job_resumes_exactly(stage1):
    folder, data = stage1
    args = ["--model", str(folder / "one" / "base"), "--data", str(data), "--run-dir", str(folder / "killed"),
            "--rank", "4", "--dropout", "0", "--lr", "2e-3", *COMMON, "--grad-accum", "2"]
    # the second process dies by SIGKILL after step 5; the checkpoint of step 3 is the last good one
    died = torchrun("train_sft.py", args, kill_at=5, check=False)
    assert died.returncode != 0
    # the process left says so in one line, with the command that continues the job
    assert re.search(r"^train_sft.py: error: lost contact with another process \(.*\); the last checkpoint in "
                     rf".*killed is kept; continue with `torchrun --nproc_per_node 2 train_sft.py --run-dir "
                     rf"{re.escape(str(folder / 'killed'))} --resume`$", died.stderr, re.M), died.stderr[-3000:]
    assert max(r["step"] for r in log(folder / "killed")) <= 6
    torchrun("train_sft.py", [*args, "--resume"])
    if not (folder / "two").exists():
        torchrun("train_sft.py", [*args[:5], str(folder / "two"), *args[6:]])
    assert_same_run(folder / "two", folder / "killed", exact=True)
    with pytest.raises(training.TrainingError, match="was started on 2 processes, this is 1"):
        train_sft.main(train_sft.parse_args([*args, "--resume", "--max-steps", "12"]))  # here: one process


def test_two_processes_train_a_head_as_one_does(stage1):
    folder, data = stage1
    common = ["--target", "t", "--data", str(data), "--lora", str(folder / "one" / "best"), "--lr", "1e-3", *COMMON]
    train_head.main(train_head.parse_args([*common, "--grad-accum", "4", "--run-dir", str(folder / "head-one"),
                                           "--out", str(folder / "one.safetensors")]))
    torchrun("train_head.py", [*common, "--grad-accum", "2", "--run-dir", str(folder / "head-two"),
                               "--out", str(folder / "two.safetensors")])
    assert_same_run(folder / "head-one", folder / "head-two")
    assert_same_tensors(folder / "one.safetensors", folder / "two.safetensors")
