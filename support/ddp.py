"""Data parallelism under torchrun: N processes, each with the whole frozen base and its share of every step.

`torchrun --nproc_per_node N train_sft.py ...` (or several nodes with --nnodes and --rdzv-endpoint) sets
RANK, LOCAL_RANK and WORLD_SIZE in each process's environment; `from_env()` reads them. A plain `python
train_sft.py` sets none and gets the one-process World, which starts no process group and never
communicates. What crosses the network is the trainable gradients only (PyTorch's
DistributedDataParallel, all-reduced once per optimizer step) and a few numbers per logged step: the
frozen base is loaded by every process from its own disk and never sent. Backend: nccl on CUDA, gloo on
the CPU. Why not FSDP: the frozen bf16 base (5.6 GB for Phi-2) fits every GPU this project targets and
the trainable state is small; sharding it pays only for full fine-tuning, which this project leaves out.
"""

import contextlib
import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from phi2.errors import UsageError


class DistributedError(UsageError):
    """A process group that cannot start, or torchrun settings this project cannot run."""


@dataclass(frozen=True)
class World:
    rank: int = 0  # this process, 0 .. size-1
    local_rank: int = 0  # this process on its node: its GPU
    size: int = 1  # processes in all

    @property
    def is_main(self) -> bool:
        """Rank 0, the one process that writes files, logs and the progress bar."""
        return self.rank == 0

    def barrier(self):
        if self.size > 1:
            dist.barrier()

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """tensor summed over every process, in place (one all-reduce)."""
        if self.size > 1:
            dist.all_reduce(tensor)
        return tensor

    def mean(self, total: float, count: int, device: torch.device) -> float:
        """total / count, each summed over the processes."""
        sums = self.sum_(torch.tensor([total, count], dtype=torch.float64, device=device))
        total, count = sums.tolist()
        return total / max(count, 1)

    def gather(self, tensor: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
        """Every process's copy of tensor (same shape everywhere), on the CPU; sent through device (nccl
        moves CUDA tensors only)."""
        if self.size == 1:
            return [tensor]
        parts = [torch.empty_like(tensor, device=device) for _ in range(self.size)]
        dist.all_gather(parts, tensor.to(device))
        return [p.cpu() for p in parts]

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the body, then the others: for work that writes a file the others then read."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


def from_env() -> World:
    """This process's place, from the variables torchrun sets; the one-process World without them."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size == 1:
            return World()
        return World(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), size)
    except (KeyError, ValueError):
        raise DistributedError("WORLD_SIZE is set but RANK is missing or not a number; start several processes "
                               "with torchrun, or unset WORLD_SIZE for one") from None


def device_name(name: str, world: World) -> str:
    """--device for this process: under torchrun, `auto` or `cuda` means the GPU of its local rank."""
    if world.size > 1 and name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{world.local_rank}"
    if world.size > 1 and name.startswith("cuda:"):
        error = DistributedError(f"--device {name} under torchrun would put every process on that one GPU; pass "
                                 "--device cuda (each process takes the GPU of its local rank), and choose the GPUs "
                                 "with CUDA_VISIBLE_DEVICES")
        error.rank_0_says = True  # every process finds it: said once
        raise error
    return name


def start(world: World, device: torch.device):
    """Join the process group (once per process): nccl for CUDA, gloo for the CPU."""
    if world.size == 1 or dist.is_initialized():
        return
    if device.type == "mps":
        raise DistributedError("torchrun with --device mps: PyTorch has no multi-process backend for MPS; run one "
                               "process with python, or use --device cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
        if "OMP_NUM_THREADS" not in os.environ:  # the processes on this machine share its cores; the user's wins
            local = int(os.environ.get("LOCAL_WORLD_SIZE", world.size))
            torch.set_num_threads(max(1, torch.get_num_threads() // local))


def wrap(module: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    """module under DistributedDataParallel when there are several processes, else module itself.

    Only parameters with requires_grad are DDP's (the adapter's; the frozen base is left out), and none is
    broadcast at the start (init_sync=False: every process initialised them from the same seed, or loaded
    them from the same checkpoint). Buffers (RoPE tables) are not synced either: each process builds its own.
    """
    if world.size == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    # no buffer syncing: torch 2.13 renamed the flag, older releases know only the first name
    new_name = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    no_buffer_sync = {"forward_sync_buffers" if new_name else "broadcast_buffers": False}
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   init_sync=False, **no_buffer_sync)
