"""Run a trainer and SIGKILL it right after optimizer step N, in the last process under torchrun:
`python tests/kill_at_step.py N train_head.py ARGS...`. The fault the resume tests inject, from outside the
product: AdamW.step is wrapped before the trainer builds its optimizer."""

import os
import runpy
import signal
import sys
from pathlib import Path

import torch

kill_at, script, *args = sys.argv[1:]
sys.path.insert(0, str(Path(script).resolve().parent))
if int(os.environ.get("RANK", "0")) == int(os.environ.get("WORLD_SIZE", "1")) - 1:
    step, steps = torch.optim.AdamW.step, [0]

    def step_then_die(self, *a, **kw):
        out = step(self, *a, **kw)
        steps[0] += 1
        if steps[0] == int(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    torch.optim.AdamW.step = step_then_die
sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")
