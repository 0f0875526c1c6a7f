"""What every command line shares: one parser style, the hardware flags, checked numbers, one error exit.

Each CLI is `parse_args(argv) -> config dataclass -> main(cfg)`, and its `__main__` block is
`cli.run("train_sft.py", main, parse_args)`: a UsageError (any module's own error class derives from it)
prints as one line `NAME: error: ...` and exits 2, as argparse does for a bad flag; Ctrl-C exits 130 with
one line. Every flag has help text, and --help shows each default.
"""

import argparse
import math
import os
import re
import sys

import torch

from phi2.errors import UsageError  # noqa: F401 (re-exported: cli.UsageError)
from support.hardware import DEVICES, PRECISIONS
from support.llm import ENV_NAME


class _ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where there is none to show (None, "", a switch that is off)."""

    def _get_help_string(self, action):
        nothing = action.default is None or action.default == "" or action.default is False
        if nothing or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


# flags whose values are not repeated (a word of the flag's name), and values that look like a key (long, unspaced,
# letters and digits mixed, not starting as a path does), whatever flag they follow
SECRET = re.compile(r"(?:^|[-_])(?:key|token|secret|pass(?:word)?|auth|bearer)s?(?:$|[-_])", re.IGNORECASE)
KEYLIKE = re.compile(r"(?=.*[A-Za-z])(?=.*[0-9])[A-Za-z0-9_+=-][A-Za-z0-9_+=./-]{23,}")


class _Parser(argparse.ArgumentParser):
    """argparse, with no abbreviated flags (--judge-key would be taken for --judge-key-env, and its value, a key,
    printed as the variable's name) and no key in the message about unknown arguments: the value of a flag that
    names a key, token or secret, or any long unspaced word, is shown as <hidden>."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)

    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            shown = [_shown(arg, before) for arg, before in zip(extras, ["", *extras])]
            self.error(f"unrecognized arguments: {' '.join(shown)}")
        return namespace


def _shown(arg: str, before: str) -> str:
    """An unknown argument as the message shows it, before: the one ahead of it."""
    flag, _, value = arg.partition("=")
    if arg.startswith("-") and value and (SECRET.search(flag.lstrip("-")) or KEYLIKE.fullmatch(value)):
        return flag + "=<hidden>"
    after_secret = before.startswith("-") and "=" not in before and SECRET.search(before.lstrip("-"))
    if after_secret or (not arg.startswith("-") and KEYLIKE.fullmatch(arg)):
        return "<hidden>"
    return arg


def parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose description is the first paragraph of a module docstring and whose help shows defaults."""
    first = " ".join(doc.strip().split("\n\n")[0].split()).rstrip(":")
    return _Parser(description=first, formatter_class=_ShowDefaults)


def add_hardware_args(p: argparse.ArgumentParser, d=None):
    """--device and --precision, with the defaults of d (a config with fields of these names; else auto)."""
    p.add_argument("--device", default=d.device if d else "auto",
                   help=f"where to compute: {DEVICES} (auto: CUDA, then MPS, then CPU)")
    p.add_argument("--precision", default=d.precision if d else "auto", choices=PRECISIONS,
                   help="auto: bf16 where the hardware runs it natively, fp16 + gradient scaling on CUDA GPUs "
                        "without bf16, else fp32")


def _number(kind, low, low_ok, name):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        if value < low or (value == low and not low_ok):
            raise argparse.ArgumentTypeError(f"{text} must be {'at least' if low_ok else 'above'} {low:g}")
        return value
    parse.__name__ = name  # argparse names the type in its messages
    return parse


positive_int = _number(int, 1, True, "positive integer")
count = _number(int, 0, True, "count")
positive_float = _number(float, 0.0, False, "positive number")
nonnegative_float = _number(float, 0.0, True, "non-negative number")


def probability(text):
    value = nonnegative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text} must be at most 1")
    return value


def fraction(text):
    value = nonnegative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"{text} must be below 1")
    return value


def env_name(text):
    """The name of an environment variable (for the --...-key-env flags). A value that cannot be one may be the key
    itself, given by mistake: the message does not repeat it."""
    if not ENV_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError("takes the name of an environment variable holding the key (letters, digits "
                                         "and _), not the key itself: e.g. export MY_KEY=... and pass MY_KEY")
    return text


class Once(argparse.Action):
    """A flag that may be given once: a second is refused, not silently taking the first one's place."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} given twice; this command takes one (run it once for each)")
        setattr(namespace, self.dest, values)


def run(name: str, main, parse_args, argv=None, on_interrupt=""):
    """main(parse_args(argv)), with every UsageError as one line on stderr and exit status 2; on_interrupt:
    what to tell the user after Ctrl-C (how to go on), or a function that says it."""
    try:
        return main(parse_args(argv))
    except UsageError as e:
        if not getattr(e, "rank_0_says", False) or os.environ.get("RANK", "0") == "0":  # (torchrun's processes)
            print(f"{name}: error: {e}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 2))
    except (torch.OutOfMemoryError, RuntimeError) as e:  # one line, not the allocator's page of statistics
        if not isinstance(e, torch.OutOfMemoryError) and "out of memory" not in str(e):  # (MPS raises RuntimeError)
            raise
        first = str(e).split(". ")[0].split("\n")[0][:200]
        print(f"{name}: error: out of memory on the device ({first}); to train, try a smaller --batch-size with a "
              "larger --grad-accum, --grad-checkpointing or a shorter --max-len; to decode, a smaller --batch-size "
              "(--max-batch to serve)", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"{name}: interrupted{on_interrupt() if callable(on_interrupt) else on_interrupt}", file=sys.stderr)
        sys.exit(130)
