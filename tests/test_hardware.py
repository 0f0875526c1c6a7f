"""--device and --precision: the auto choices on each kind of hardware (probes mocked), the one-line refusal
of a device that is not there, and that no step of training, caching or decoding makes a tensor anywhere
but on the model's device."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lora
import phi2
from head_adapter import HeadAdapter
from phi2.generation import decode_step
from phi2.model import answer_rows
from support import hardware

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def machine(monkeypatch):
    """Pretend to be a machine: machine(cuda=..., cuda_bf16=..., mps=..., macos14=..., cpu_bf16=...)."""
    def pretend(cuda=False, cuda_bf16=False, mps=False, macos14=False, cpu_bf16=False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: int(cuda))
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4" if not cuda_bf16 else "H200")
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0) if cuda_bf16 else (7, 5))
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
        monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: macos14)
        monkeypatch.setattr(hardware, "cpu_bf16_native", lambda: cpu_bf16)
        monkeypatch.setattr(hardware, "_warned", set())
    return pretend


@pytest.mark.parametrize("probes, device, precision", [
    (dict(cuda=True, cuda_bf16=True), "cuda:0", "bf16"),
    (dict(cuda=True, cuda_bf16=False), "cuda:0", "fp16"),  # a T4: fp16 autocast with a gradient scaler
    (dict(cuda=True, cuda_bf16=True, mps=True), "cuda:0", "bf16"),  # CUDA before MPS
    (dict(mps=True, macos14=True), "mps", "bf16"),
    (dict(mps=True, macos14=False), "mps", "fp32"),
    (dict(cpu_bf16=True), "cpu", "bf16"),  # AMX or AVX-512 BF16
    (dict(cpu_bf16=False), "cpu", "fp32"),  # AVX2 only
])
def test_auto_picks_the_device_and_the_precision_it_does_well(machine, probes, device, precision):
    machine(**probes)
    hw = hardware.resolve("auto", "auto")
    assert (str(hw.device), hw.precision) == (device, precision)
    assert hw.needs_scaler == (precision == "fp16")
    assert hw.reason.startswith("auto; ") and len(hw.reason) > 20  # says why
    assert hw.describe().startswith(f"device {device}, precision {precision} (")


def test_an_explicit_choice_the_hardware_does_badly_runs_and_warns_once(machine, capsys):
    machine(cpu_bf16=False)
    for _ in range(3):
        hw = hardware.resolve("cpu", "bf16")
        assert hw.precision == "bf16" and hw.dtype == torch.bfloat16
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 1 and "60x slower than fp32" in warnings[0] and "auto picks fp32" in warnings[0]
    machine(cpu_bf16=True)
    hardware.resolve("cpu", "bf16")
    assert capsys.readouterr().err == ""  # a CPU with native bf16: nothing to say


@pytest.mark.parametrize("name, message", [
    ("cuda", "--device cuda: no such CUDA device here; available: cpu"),
    ("cuda:3", "--device cuda:3: no such CUDA device here; available: cpu"),
    ("mps", "--device mps: MPS is not available here; available: cpu"),
    ("tpu", "not a device name"),
])
def test_a_device_that_is_not_there_is_refused_in_one_line(machine, name, message):
    machine()
    with pytest.raises(hardware.DeviceError, match=message):
        hardware.resolve(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("script, args", [
    ("train_sft.py", ["--model", "tiny"]),
    ("generate.py", ["a prompt"]),
])
def test_cli_with_a_missing_device_exits_with_one_line(tmp_path, script, args):
    result = subprocess.run([sys.executable, str(ROOT / script), *args, "--device", "cuda", "--run-dir",
                             str(tmp_path / "run")] if script == "train_sft.py" else
                            [sys.executable, str(ROOT / script), *args, "--device", "cuda"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"{script}: error: --device cuda: no such CUDA device here; "
                                                  "available: cpu"]
    assert not (tmp_path / "run").exists()


class FactoryDevices(TorchDispatchMode):
    """Records the op and device of every tensor made from no tensor at all (empty, zeros, arange, ...)."""

    def __init__(self):
        super().__init__()
        self.off_device = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [x for x in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        if not inputs:
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    self.off_device.append(f"{func} on {t.device}")
        return out


def test_training_caching_and_decoding_make_tensors_only_on_the_models_device(tiny_cfg):
    """The model on the meta device: any tensor the compute path makes on the CPU (a factory without
    device=) is recorded. The CPU holds only the data: token ids and labels, as collated."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = phi2.Phi2(tiny_cfg)
    model.gradient_checkpointing = True
    lora.inject(model, rank=4, alpha=8.0, dropout=0.1)  # dropout on: its mask must be made on the device too
    model.train()
    ids = torch.randint(0, tiny_cfg.vocab_size, (2, 12))
    labels = ids.clone()
    labels[:, :4] = -100
    head = HeadAdapter(model.lm_head, None)
    low_rank_head = HeadAdapter(model.lm_head, 4)

    with FactoryDevices() as mode:
        loss, n = model.loss(ids.to("meta"), labels)  # stage 1: LoRA, checkpointing, dropout, fused loss
        loss.backward()
        with torch.no_grad():  # stage 2: the body's outputs at the answer positions, then the head
            rows, next_ids = answer_rows(model.eval().hidden_states(ids[:, :-1].to("meta")), labels)
        for h in (head, low_rank_head):
            h.loss(rows, next_ids).backward()
        with torch.no_grad():  # decoding: prefill, then one step
            caches = [model.new_cache(16) for _ in range(2)]
            h = model.hidden_states(ids[:, :8].to("meta"), caches)[:, -1]
            decode_step(model, model.lm_head(h).argmax(dim=-1), caches)
    assert n == 16 and loss.device.type == "meta"
    assert mode.off_device == []


def test_the_placement_test_can_fail(tiny_cfg):
    """The recorder above does catch a tensor made on the CPU in the middle of the compute path."""
    with torch.device("meta"):
        model = phi2.Phi2(tiny_cfg)
    with FactoryDevices() as mode:
        h = model.hidden_states(torch.zeros(1, 4, dtype=torch.long, device="meta"))
        h + torch.zeros(tiny_cfg.n_embd).to("meta")  # the mistake: a CPU tensor, then moved
    assert mode.off_device == ["aten.zeros.default on cpu"]


def test_auto_on_a_cpu_with_native_bf16_picks_fp32_for_a_narrow_model_and_says_why(machine):
    import phi2
    machine(cpu_bf16=True)
    narrow = hardware.resolve("cpu", "auto", phi2.PRESETS["tiny"])
    wide = hardware.resolve("cpu", "auto", phi2.PRESETS["phi-2"])
    assert (narrow.precision, wide.precision) == ("fp32", "bf16")
    assert "128 wide is faster in fp32" in narrow.reason and narrow.to_dict()["precision"] == "fp32"
    machine(cpu_bf16=False)
    assert hardware.resolve("cpu", "auto", phi2.PRESETS["phi-2"]).precision == "fp32"


def test_a_narrow_model_decodes_on_one_thread_unless_the_user_says_otherwise(monkeypatch):
    import phi2
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert hardware.cpu_threads(phi2.PRESETS["tiny"], "decode") == 1
        assert hardware.cpu_threads(phi2.PRESETS["tiny"], "train") == hardware._CORES
        assert hardware.cpu_threads(phi2.PRESETS["phi-2"], "decode") == hardware._CORES
        assert hardware.resolve("cpu", "fp32", phi2.PRESETS["tiny"], work="decode").describe().endswith(", 1 thread")
        monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's own setting wins
        torch.set_num_threads(3)
        assert hardware.cpu_threads(phi2.PRESETS["tiny"], "decode") == 3
    finally:
        torch.set_num_threads(before)
