"""Where a run computes and in what precision: `--device` and `--precision`, resolved once at start-up.

`auto` picks CUDA, then Apple's MPS, then the CPU, and the precision the chosen hardware does well:
bf16 on a CUDA GPU that has it; fp16 autocast with a gradient scaler on one that does not (a T4); on a CPU,
bf16 only where it runs natively (AMX or AVX-512 BF16), else fp32, because a CPU with AVX2 only emulates
bf16 matmuls at about 1/60 of its fp32 speed (0.8 vs 53 GFLOP/s on a 1024^3 matmul, measured on a 2-core
AMD EPYC); on MPS, bf16 from macOS 14, else fp32. An explicit choice that the hardware does badly runs, with
one warning that says why. Everything below the command lines takes the resolved `Hardware` and never
picks a device or dtype of its own.
"""

import contextlib
import os
import platform
import sys
from dataclasses import dataclass

import torch

from phi2.errors import UsageError

DEVICES = "auto, cpu, cuda, cuda:N, mps"
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class DeviceError(UsageError):
    """A --device that is not there, or a --precision it cannot run."""


@dataclass(frozen=True)
class Hardware:
    device: torch.device
    precision: str  # "bf16", "fp16" or "fp32"
    reason: str  # why this device and precision: the first line a run prints, and part of its saved config
    threads: int | None = None  # the CPU threads this process computes on (None: not a CPU)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the frozen weights and of autocast's matmuls."""
        return DTYPES[self.precision]

    @property
    def needs_scaler(self) -> bool:
        """fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range and needs none."""
        return self.precision == "fp16"

    def autocast(self):
        """A fresh autocast context for the forward pass (an autocast object must not be entered twice)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def describe(self) -> str:
        threads = f", {self.threads} thread{'s' * (self.threads != 1)}" if self.threads else ""
        return f"device {self.device}, precision {self.precision} ({self.reason}){threads}"

    def to_dict(self) -> dict:
        return {"device": str(self.device), "precision": self.precision, "reason": self.reason,
                "threads": self.threads}


def cpu_bf16_native() -> bool:
    """Whether this CPU has bf16 matmul instructions (AVX-512 BF16 or AMX), which torch can tell."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def cuda_bf16_native(device: torch.device) -> bool:
    """Whether this GPU computes in bf16 (compute capability 8.0, Ampere, or newer). torch's
    is_bf16_supported() also says yes where bf16 is only emulated (a T4), and asks about the current device."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def available_devices() -> list[str]:
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        found.append("mps")
    return found


def resolve_device(name: str = "auto") -> torch.device:
    """The device named by --device; one line naming what is available when it is not there."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"--device {name!r} is not a device name; use one of {DEVICES}") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"--device {name!r} is not supported; use one of {DEVICES}")
    if device.type == "cuda":
        index = 0 if device.index is None else device.index
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: no such CUDA device here; available: {', '.join(available_devices())}")
        return torch.device("cuda", index)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"--device mps: MPS is not available here; available: {', '.join(available_devices())}")
    return device


BF16_MIN_WIDTH = 256  # on a CPU with native bf16, narrower models run faster in fp32 (bench/cpu.py)
NARROW = 256  # a narrower model decodes on one CPU thread (bench/cpu.py)


def auto_precision(device: torch.device, config=None) -> tuple[str, str]:
    """(precision, reason) for --precision auto on device, for a model of this config (None: Phi-2's width)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if cuda_bf16_native(device):
            return "bf16", f"{name} computes in bf16"
        return "fp16", f"{name} has no bf16: fp16 autocast with a gradient scaler"
    if device.type == "mps":
        if torch.backends.mps.is_macos_or_newer(14, 0):
            return "bf16", "MPS on macOS 14 or newer computes in bf16"
        return "fp32", "MPS before macOS 14 has no bf16"
    capability = torch.backends.cpu.get_cpu_capability()
    width = 2560 if config is None else config.n_embd
    if cpu_bf16_native() and width < BF16_MIN_WIDTH:
        return "fp32", (f"the CPU has native bf16 (torch says {capability}), but a model {width} wide is faster in "
                        f"fp32: below {BF16_MIN_WIDTH}, casts and small matmuls cost more than bf16 saves")
    if cpu_bf16_native():
        return "bf16", f"the CPU has native bf16 (AMX or AVX-512 BF16; torch says {capability})"
    return "fp32", (f"the CPU has no native bf16 (torch says {capability}, no AVX-512 BF16 or AMX), where bf16 "
                    "matmuls run tens of times slower than fp32")


_warned = set()


def cpu_threads(config=None, work: str = "train") -> int:
    """The intra-op threads for this work on the CPU, set now: the user's OMP_NUM_THREADS if given; one to decode
    a model narrower than NARROW, whose matmuls are too small to split (a second thread costs more in
    synchronisation than it saves, and fights any other process for the cores); else torch's default, a
    thread per core."""
    if "OMP_NUM_THREADS" not in os.environ:
        narrow = config is not None and config.n_embd < NARROW
        torch.set_num_threads(1 if work == "decode" and narrow else _CORES)
    return torch.get_num_threads()


_CORES = torch.get_num_threads()  # torch's own default, read before anything changes it


def resolve(device: str = "auto", precision: str = "auto", config=None, work: str = "train") -> Hardware:
    """--device and --precision, resolved for a model of this config (its width decides on a CPU) and this work
    ("train" or "decode"), which also sets the CPU threads; an explicit precision the hardware does badly warns
    once."""
    if precision not in PRECISIONS:
        raise DeviceError(f"--precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    dev = resolve_device(device)
    chosen, reason = auto_precision(dev, config)
    how = "auto" if device == "auto" else "as asked"
    threads = cpu_threads(config, work) if dev.type == "cpu" else None
    if precision == "auto":
        return Hardware(dev, chosen, f"{how}; {reason}", threads)
    warning = None
    if dev.type == "cpu" and precision == "bf16" and not cpu_bf16_native():
        warning = ("--precision bf16 on a CPU without native bf16 (no AVX-512 BF16 or AMX): its bf16 matmuls are "
                   "emulated, about 60x slower than fp32 (0.8 vs 53 GFLOP/s measured on an AVX2 AMD EPYC); "
                   "--precision auto picks fp32 here")
    elif dev.type == "cpu" and precision == "fp16":
        warning = "--precision fp16 on a CPU: fp16 matmuls are slow on CPUs; --precision auto picks " + chosen
    elif dev.type == "cuda" and precision == "bf16" and not cuda_bf16_native(dev):
        warning = "--precision bf16 on a GPU without native bf16: it is emulated and slow; auto picks fp16"
    if warning and warning not in _warned:
        _warned.add(warning)
        print(f"warning: {warning}", file=sys.stderr)
    return Hardware(dev, precision, f"{how}; --precision {precision} as asked", threads)


def cpu_name() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it (else what platform knows)."""
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gb(device: torch.device) -> float:
    """The device's memory in GB: the GPU's, or the machine's for the CPU (and MPS, which shares it)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 1e9
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on device: through pinned memory and without waiting on CUDA, as is on the CPU."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
