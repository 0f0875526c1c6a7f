"""The offline quickstart: the whole pipeline on the `tiny` preset and the bundled data, in a few minutes on a
CPU (`bash quickstart.sh` installs the project and runs this).

  0. base, for the demo only: a random-init tiny Phi-2 and a tokenizer trained on the bundled texts get
     half a minute of plain language-model training on the prompts and rewrites of stage 1's training
     pairs, as separate texts, without the template. It stands in for Phi-2's pretraining: LoRA alone
     cannot teach a random model to write, because its frozen random head caps the logits. The template
     is left for stage 1 to teach, and its validation pairs stay unseen: a base trained on them could
     only score worse on them in stage 1.
  1. stage 1: train_sft.py, LoRA on data/prompt_pairs.jsonl.
  2. stage 2: train_head.py for two targets, `concise` and `structured` (data/targets/*.jsonl).
  3. held-out prompts (stage 2's validation split) rewritten with each head, side by side, and ROUGE-L
     against each style's reference rewrites.

It shows the mechanism (each head pulls the rewrites towards its target's style) on a model of about a
million parameters; the real use is Phi-2 with pairs collected from real target LLMs (target_data.py).
"""

import support.threads  # noqa: F401  (first: OpenMP reads its settings when torch loads)

import contextlib
import io
import math
import os
import shlex
import shutil
import statistics
import textwrap
import time
from pathlib import Path

import torch

import generate
import phi2
import train_head
import train_sft
from prompts import DATA_DIR, DEFAULT_DATA, Example, collate, format_answer, read_pairs, split_pairs
from support import cli, hardware
from support.hardware import to_device

STYLES = ("concise", "structured")
MARKER = ".quickstart"  # a folder holding this file is ours to replace


def make_base(folder: Path, steps: int, hw: hardware.Hardware, seed: int = 0):
    """Stage 0 (demo only): a tiny Phi-2 with a tokenizer of its own, trained briefly on the prompts and rewrites
    of stage 1's training pairs, as plain texts."""
    defaults = train_sft.TrainConfig()
    pairs = split_pairs(read_pairs(DEFAULT_DATA), defaults.val_fraction, defaults.seed)[0]
    styles = [p for s in STYLES for p in read_pairs(DATA_DIR / "targets" / f"{s}.jsonl")]
    texts = [t for p in pairs for t in (p.prompt.strip(), p.improved.strip())]  # plain text: no template
    config = phi2.PRESETS["tiny"]
    tokenizer = phi2.train_tokenizer(texts + [format_answer(p.improved) for p in styles], config.vocab_size)
    model = phi2.build_model(config, seed=seed).to(hw.device).train()
    corpus = [Example(ids, ids) for ids in (tokenizer.encode(t) + [tokenizer.eos_id] for t in texts)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):  # warm-up then cosine, batches of 16 random pairs
        lr = 3e-3 * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(corpus), (16,), generator=generator).tolist()
        ids, labels = collate([corpus[i] for i in idx], tokenizer.pad_id)
        with hw.autocast():
            loss, n = model.loss(to_device(ids, hw.device), labels)
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    folder.mkdir(parents=True, exist_ok=True)
    phi2.save_hf_checkpoint(model.cpu(), folder)
    tokenizer.save(folder)
    return (loss / n).item()


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 on lower-cased whitespace tokens: from the longest common subsequence."""
    c, r = candidate.lower().split(), reference.lower().split()
    prev = [0] * (len(r) + 1)
    for x in c:
        cur = [0]
        for j, y in enumerate(r):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(c), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def held_out(seed=1337, val_fraction=0.1):
    """Stage 2's validation split (the same prompts in both style sets): [(prompt, {style: reference})]."""
    splits = {s: split_pairs(read_pairs(DATA_DIR / "targets" / f"{s}.jsonl"), val_fraction, seed)[1]
              for s in STYLES}
    prompts = [p.prompt for p in splits[STYLES[0]]]
    assert all([p.prompt for p in splits[s]] == prompts for s in STYLES), "the style sets must share prompts"
    return [(prompt, {s: splits[s][i].improved for s in STYLES}) for i, prompt in enumerate(prompts)]


def run_cli(name, module, argv, quiet):
    """Run a CLI's main in this process, showing the command it stands for and how long it took."""
    print(f"\n$ python {name}.py {' '.join(argv)}", flush=True)
    t = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
        result = module.main(module.parse_args(argv))
    print(f"   ({time.perf_counter() - t:.0f} s)", flush=True)
    return result


def run(out: Path, base_steps=250, sft_epochs=6, head_epochs=10, max_new_tokens=80, quiet=False, device="auto",
        precision="auto") -> dict:
    """The whole pipeline into out; returns {(head, style): mean ROUGE-L on the held-out prompts}."""
    if out.exists():
        if not (out / MARKER).exists():
            raise cli.UsageError(f"{out} exists and is not a quickstart folder; choose another --run-dir")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("made by quickstart.py; replaced by the next run\n")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    t0 = time.perf_counter()
    hw = hardware.resolve(device, precision, phi2.PRESETS["tiny"])
    print(hw.describe())
    on = ["--device", device, "--precision", precision]

    print(f"\n== stage 0 (demo only): a random tiny Phi-2, trained {base_steps} steps on stage 1's training texts")
    loss = make_base(out / "base", base_steps, hw)
    print(f"   loss {loss:.2f}, written to {out / 'base'} ({time.perf_counter() - t0:.0f} s)")

    print("\n== stage 1: LoRA on the bundled prompt pairs")
    run_cli("train_sft", train_sft, ["--model", str(out / "base"), "--run-dir", str(out / "sft"), "--epochs",
                                     str(sft_epochs), "--lr", "1e-3", "--batch-size", "8", "--grad-accum", "1",
                                     "--warmup-steps", "10", "--eval-interval", "50", *on], quiet)

    print("\n== stage 2: one head per target style")
    for style in STYLES:
        run_cli("train_head", train_head, [
            "--target", style, "--data", os.path.relpath(DATA_DIR / "targets" / f"{style}.jsonl"), "--lora",
            str(out / "sft" / "best"), "--out", str(out / f"{style}.safetensors"), "--run-dir",
            str(out / f"head-{style}"), "--epochs", str(head_epochs), "--lr", "3e-3", "--batch-size", "8",
            "--grad-accum", "1", "--eval-interval", "20", *on], quiet)

    print("\n== rewriting the held-out prompts with each head")
    rows = held_out()
    heads = [a for s in STYLES for a in ("--head", str(out / f"{s}.safetensors"))]
    argv = ["--lora", str(out / "sft" / "best"), *heads,
            "--max-new-tokens", str(max_new_tokens), *on, "--json", *[prompt for prompt, _ in rows]]
    with contextlib.redirect_stdout(io.StringIO()):
        records = run_cli("generate", generate, argv, quiet=True)
    outputs = {(r["index"], r["target"]): r["output"] for r in records}
    print_side_by_side(rows, outputs)

    scores = {(head, style): statistics.mean(rouge_l(outputs[i, head], refs[style]) for i, (_, refs) in enumerate(rows))
              for head in STYLES for style in STYLES}
    print("\nROUGE-L of each head's rewrites against each style's references (higher is closer):")
    print(f"{'':18s}" + "".join(f"{s + ' refs':>18s}" for s in STYLES))
    for head in STYLES:
        print(f"{head + ' head':18s}" + "".join(f"{scores[head, s]:18.3f}" for s in STYLES))
    curves = ", ".join(str(out / run / "curves.svg") for run in ("sft", *(f"head-{style}" for style in STYLES)))
    print(f"\ndone in {time.perf_counter() - t0:.0f} s; everything is in {out}, the training curves in {curves}. This "
          "is a tiny model trained for a minute: it shows the mechanism, not the quality Phi-2 reaches.")
    args = shlex.join(["--lora", str(out / "sft" / "best"),
                       *(a for style in STYLES for a in ("--head", str(out / f"{style}.safetensors")))])
    print(f"Next, rewrite your own prompts with it, or serve it behind the OpenAI API (docs/serving.md):\n"
          f"  python generate.py {args} 'a poem about rain'\n  python serve.py {args} --port 8000")
    return scores


def print_side_by_side(rows, outputs, width=46):
    for i, (prompt, _) in enumerate(rows):
        print(f"\n> {prompt}")
        columns = [[f"[{s}]"] + sum((textwrap.wrap(line, width) or [""] for line in outputs[i, s].splitlines()), [])
                   for s in STYLES]
        for left, right in zip(*(col + [""] * (max(map(len, columns)) - len(col)) for col in columns)):
            print(f"  {left:{width}s} | {right}")


def parse_args(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--run-dir", default="runs/quickstart", help="the folder for everything the quickstart makes")
    p.add_argument("--base-steps", type=cli.positive_int, default=250, help="stage-0 steps for the tiny base")
    p.add_argument("--quiet", action="store_true", help="hide the training progress bars")
    cli.add_hardware_args(p)
    return p.parse_args(argv)


def main(args) -> dict:
    return run(Path(args.run_dir), base_steps=args.base_steps, quiet=args.quiet, device=args.device,
               precision=args.precision)


if __name__ == "__main__":
    cli.run("quickstart.py", main, parse_args)
