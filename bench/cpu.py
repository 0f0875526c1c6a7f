"""CPU speed by precision, and by company: a training step and a decode in fp32 and bf16 for the tiny and the
2-layer full-width shapes; then one process alone against two at once. Ratios from one run of this script.

    python bench/cpu.py [--shapes tiny,phi-2-2layer] [--works train,decode] [--policies ours,today,passive]
                        [--rounds 3] [--against DIR]

Part 1, per shape: each precision's LoRA training step and greedy decode (8 prompts, 24 new tokens), and what
`--precision auto` picks, with its time over the fastest explicit precision's (the goal: within 10%).
Part 2: the same decode and training step in a child process alone, then two children at once, under each
policy: `ours` (what every command sets: support/threads.py's short spin at OpenMP's barriers, and
hardware.cpu_threads' thread count), `today` (libgomp's own default, spinning 300,000 rounds at each barrier,
a thread per core) and `passive` (OMP_WAIT_POLICY=PASSIVE, a thread per core). The goals: two at once take at
most 2.5x one alone, and one alone under ours within 5% of today's. A narrow shape's steps take milliseconds
and vary from run to run, so its children run --rounds times, the policies alternating, and medians are shown.
`--against DIR` adds `before`: the same work in an older checkout of the project (`git worktree add ../before
COMMIT`) under libgomp's defaults, what "today" meant when the thread settings came in. Run it with nothing
else on the machine.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# set in the children of --against (only there): the older checkout they measure
BEFORE = os.environ.get("BENCH_ROOT") if "--worker" in sys.argv else None
ROOT = Path(BEFORE or Path(__file__).resolve().parents[1])
sys.path.insert(0, str(ROOT))

if not BEFORE:  # (an older checkout may not have it; `before` runs under libgomp's defaults anyway)
    import support.threads  # noqa: F401  (first: OpenMP reads its settings when torch loads)

import torch

import lora
import phi2
from phi2.generation import generate
from prompts import IGNORE_INDEX, Example, collate

if BEFORE and not (ROOT / "support" / "hardware.py").exists():
    import hardware  # a checkout from before support/
else:
    from support import hardware

SHAPES = {"tiny": phi2.Phi2Config.from_name("tiny"),
          "phi-2-2layer": phi2.Phi2Config.from_name("phi-2", n_layer=2, resid_pdrop=0.0)}
POLICIES = {"ours": {}, "today": {"GOMP_SPINCOUNT": "300000"}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
            "before": {"GOMP_SPINCOUNT": "300000"}}  # before: libgomp's defaults in the --against checkout
CHOOSABLE = [policy for policy in POLICIES if policy != "before"]  # --policies; --against adds before


def train_seconds(config, precision, steps=None) -> float:
    """Median seconds of a stage-1 LoRA step (rank 32, batch 4 x 96 tokens, loss on the last 48): of 3 steps,
    or 15 of a model narrow enough that one step takes milliseconds."""
    steps = steps or (3 if config.n_embd >= 1024 else 15)
    hw = hardware.Hardware(torch.device("cpu"), precision, "bench")
    model = phi2.build_model(config, dtype=hw.dtype, seed=0)
    lora.inject(model, rank=32, alpha=64.0, dropout=0.05)
    params = lora.trainable_parameters(model)
    optimizer = torch.optim.AdamW(params.values(), lr=1e-4, fused=True)
    generator = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(4):
        ids = torch.randint(0, config.vocab_size, (96,), generator=generator).tolist()
        examples.append(Example(ids, [IGNORE_INDEX] * 48 + ids[48:]))
    ids, labels = collate(examples, 0)
    model.train()
    times = []
    for _ in range(steps + 1):  # the first is a warm-up
        t = time.perf_counter()
        with hw.autocast():
            loss, n = model.loss(ids, labels)
        (loss / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def decode_seconds(config, precision, new=24) -> float:
    """Seconds of a greedy decode of 8 prompts of 16 to 44 tokens, new tokens each (after a warm-up)."""
    model = phi2.build_model(config, dtype=hardware.DTYPES[precision], seed=0).eval()
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, config.vocab_size, (16 + 4 * i,), generator=generator).tolist() for i in range(8)]
    generate(model, prompts, 2)
    t = time.perf_counter()
    generate(model, prompts, new)
    return time.perf_counter() - t


WORKS = {"train": train_seconds, "decode": decode_seconds}


def worker(args):
    config = SHAPES[args.shape]
    if args.policy == "ours":  # the threads a command would take for this work
        hardware.cpu_threads(config, args.work)
    work = WORKS[args.work]
    print(json.dumps({"seconds": work(config, args.precision), "threads": torch.get_num_threads()}))


def child(shape, precision, work, policy, against=None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "BENCH_ROOT")}
    env.update(POLICIES[policy])
    if policy == "before":
        env["BENCH_ROOT"] = str(against)
    return subprocess.Popen([sys.executable, __file__, "--worker", shape, precision, work, policy], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def work_seconds(procs) -> float:
    """The longest of the children's own timings of their work (their start-up left out)."""
    seconds = []
    for p in procs:
        out, err = p.communicate()
        if p.returncode:
            for other in procs:
                other.kill()
            raise SystemExit(f"bench/cpu.py: a child ({' '.join(p.args[3:])}) failed:\n{err.strip()}")
        seconds.append(json.loads(out)["seconds"])
    return max(seconds)


def company(shape, work, precision, policies, rounds, against) -> dict:
    """{policy: (median seconds alone, median seconds of the slower of two at once)}, the policies alternating."""
    alone, two = {p: [] for p in policies}, {p: [] for p in policies}
    for _ in range(rounds):
        for policy in policies:
            alone[policy].append(work_seconds([child(shape, precision, work, policy, against)]))
            two[policy].append(work_seconds([child(shape, precision, work, policy, against) for _ in range(2)]))
    return {p: (statistics.median(alone[p]), statistics.median(two[p])) for p in policies}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="tiny,phi-2-2layer", help="comma-separated: " + ", ".join(SHAPES))
    p.add_argument("--works", default="train,decode", help="comma-separated: " + ", ".join(WORKS))
    p.add_argument("--policies", default="ours,today", help="comma-separated: " + ", ".join(CHOOSABLE))
    p.add_argument("--rounds", type=int, default=3,
                   help="runs of each child for a shape narrower than 1024, the policies alternating")
    p.add_argument("--against", type=Path, help="an older checkout of the project: adds the `before` policy, "
                   "its code under libgomp's defaults")
    p.add_argument("--worker", nargs=4, metavar=("SHAPE", "PRECISION", "WORK", "POLICY"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.shape, args.precision, args.work, args.policy = args.worker
        return worker(args)
    shapes, works, policies = (list(dict.fromkeys(x.split(","))) for x in (args.shapes, args.works, args.policies))
    for name, known, given in (("--shapes", SHAPES, shapes), ("--works", WORKS, works),
                               ("--policies", CHOOSABLE, policies)):
        if unknown := [x for x in given if x not in known]:
            p.error(f"{name}: no {', '.join(map(repr, unknown))}; use {', '.join(known)}"
                    + (" (`before` comes with --against DIR)" if "before" in unknown else ""))
    if args.rounds < 1:
        p.error(f"--rounds {args.rounds}: use 1 or more")
    if args.against:
        args.against = args.against.resolve()
        if not ((args.against / "phi2").is_dir() and (args.against / "lora.py").is_file()):
            p.error(f"--against {args.against}: not a checkout of this project (it needs phi2/ and lora.py)")
        policies.append("before")
    cpu = torch.backends.cpu.get_cpu_capability()
    print(f"CPU: {hardware.cpu_name()} ({cpu}; native bf16: {hardware.cpu_bf16_native()}), "
          f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("\n1. precision: seconds per training step / per decode (8 prompts x 24 tokens)")
    print(f"{'shape':14s} {'work':7s} {'fp32':>8s} {'bf16':>8s}  auto   auto / fastest")
    for shape in shapes:
        config = SHAPES[shape]
        auto = hardware.auto_precision(torch.device("cpu"), config)[0]
        for work in works:
            run = WORKS[work]
            t = {precision: run(config, precision) for precision in ("fp32", "bf16")}
            ratio = t[auto] / min(t.values())
            print(f"{shape:14s} {work:7s} {t['fp32']:8.3f} {t['bf16']:8.3f}  {auto:5s}  {ratio:.2f}")

    references = [r for r in ("today", "before") if r in policies]
    print("\n2. company: seconds of the work in one child alone, and in the slower of two at once (goal: <= 2.5x)"
          + (",\n   and each policy's time alone over a reference's (goal for ours: <= 1.05)" if references else ""))
    print(f"{'shape':14s} {'work':7s} {'precision':9s} {'policy':8s} {'alone':>7s} {'two':>7s} {'ratio':>6s}"
          + "".join(f" {'/ ' + r:>8s}" for r in references))
    for shape in shapes:
        rounds = args.rounds if SHAPES[shape].n_embd < 1024 else 1
        for work in works:
            for precision in ("fp32", "bf16"):
                times = company(shape, work, precision, policies, rounds, args.against)
                for policy, (alone, two) in times.items():
                    print(f"{shape:14s} {work:7s} {precision:9s} {policy:8s} {alone:7.3f} {two:7.3f} {two / alone:6.2f}"
                          + "".join(f" {alone / times[r][0]:8.2f}" for r in references), flush=True)


if __name__ == "__main__":
    main()
