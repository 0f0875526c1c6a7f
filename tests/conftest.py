"""Shared fixtures: a tiny config, a fixed seed, and reference checkpoints written by transformers."""

import fcntl
import os
from pathlib import Path

import pytest
import torch

from phi2 import Phi2Config

if os.environ.get("PYTEST_XDIST_WORKER"):  # test.sh runs two workers on two cores: one thread each, and
    torch.set_num_threads(1)               # the same for the subprocesses the tests start
    os.environ["OMP_NUM_THREADS"] = "1"

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PHI2_FILES = SHARED / "phi-2"


def needs_shared(path=PHI2_FILES):
    """Skip a test when ../shared (the real tokenizer, config and data) is not next to the checkout."""
    return pytest.mark.skipif(not path.exists(), reason=f"{path} is absent (only present on the dev machines)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture
def tiny_cfg():
    return Phi2Config(n_layer=2, n_head=4, n_kv_head=4, n_embd=64, intermediate_size=256, vocab_size=256,
                      block_size=64, rotary_dim=8, resid_pdrop=0.0)


# The configurations every reference-parity test runs on.
PARITY_CONFIGS = {
    "tiny": Phi2Config.from_name("tiny"),
    # full width (2560 wide, 32 heads, rotary 32 of 80), 2 layers, and a 4096-token vocabulary rather than 51200
    # (which would make the checkpoint 1 GB; the wide head's chunking is tested in test_model.py)
    "phi-2-2layer": Phi2Config.from_name("phi-2", n_layer=2, vocab_size=4096),
    "gqa": Phi2Config.from_name("tiny", n_kv_head=2),  # fewer key/value heads than query heads
}


def save_hf_reference(config: Phi2Config, folder, max_shard_size="2MB", seed=0):
    """A random-weight PhiForCausalLM saved by transformers (sharded); returns the HF model in eval mode."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    hf = transformers.PhiForCausalLM(transformers.PhiConfig(**config.to_hf_dict())).eval()
    hf.save_pretrained(folder, max_shard_size=max_shard_size)
    return hf


def skip_emulated_bf16(config: Phi2Config):
    """bf16 tests of the full-width config only where the CPU runs bf16 natively: on an AVX2-only CPU its
    bf16 matmuls are emulated about 60x slower than fp32, and the narrow configs check the same numerics."""
    from support import hardware
    if config.n_embd > 1000 and not hardware.cpu_bf16_native():
        pytest.skip("full-width bf16 on a CPU without native bf16 (emulated, minutes); runs on AMX/AVX-512 BF16 CPUs")


@pytest.fixture(scope="session", params=list(PARITY_CONFIGS))
def hf_reference(request, tmp_path_factory):
    """(config, checkpoint folder, transformers model) for each parity config, built once per test run: the
    first of test.sh's workers to need one writes it, under a lock, and the other loads what it wrote."""
    transformers = pytest.importorskip("transformers")
    config = PARITY_CONFIGS[request.param]
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    folder = root / f"hf-reference-{request.param}"
    with open(root / f"hf-reference-{request.param}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "written").exists():
            shard = "200MB" if config.n_embd > 1000 else "2MB"
            hf = save_hf_reference(config, folder, max_shard_size=shard)
            (folder / "written").touch()
            return config, folder, hf
    return config, folder, transformers.PhiForCausalLM.from_pretrained(folder).eval()


TEXTS = [f"{verb} a {thing} about {topic}, {style}." for verb in ("Write", "Explain", "Summarize", "Draft")
         for thing in ("poem", "report", "function", "plan") for topic in ("rain", "taxes", "sorting", "café life")
         for style in ("briefly", "in detail", "for children")]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A random tiny model saved in the HF layout, with a tokenizer trained on a few sentences."""
    import phi2

    folder = tmp_path_factory.mktemp("tiny-checkpoint")
    config = Phi2Config(n_layer=2, n_head=4, n_kv_head=4, n_embd=64, intermediate_size=256, vocab_size=512,
                        block_size=96, rotary_dim=8, resid_pdrop=0.0)
    phi2.save_hf_checkpoint(phi2.build_model(config), folder)
    phi2.train_tokenizer(TEXTS, config.vocab_size).save(folder)
    return folder


def pytest_collection_modifyitems(items):
    """The longest test (the whole quickstart, about 2 minutes) first, so that under test.sh's two workers
    it runs beside the rest rather than after it."""
    items.sort(key=lambda item: "test_quickstart.py" not in item.nodeid)


def load_prompter(lora_dir, dtype=torch.float32):
    """(merged model, tokenizer, base fingerprint, stage-1 id) of a prompter with no heads."""
    from support.prompter import Prompter
    p = Prompter.load(None, lora_dir, dtype=dtype)
    return p.model, p.tokenizer, p.base_fingerprint, p.stage1


def write_prompter(base, out, targets=("alpha", "beta"), head_ranks=(None, 4)):
    """A stage-1 adapter (out/lora) on the base folder and one head per target (out/{target}.safetensors), with
    random non-trivial values, saved as the trainers save them; heads take head_ranks in turn."""
    import head_adapter as ha
    import lora
    import phi2
    from support.prompter import Prompter

    model = phi2.load_model(base)
    base_fp = phi2.weights.fingerprint(model)
    lora.inject(model, rank=4, alpha=8.0)
    generator = torch.Generator().manual_seed(0)
    for m in lora.lora_modules(model).values():
        m.lora_B.data = 0.05 * torch.randn(m.lora_B.shape, generator=generator)
    lora.save_adapter(model, out / "lora", base_path=Path(base).resolve(), base_fingerprint=base_fp)
    prompter = Prompter.load(None, out / "lora")
    merged, fp, stage1 = prompter.model, prompter.base_fingerprint, prompter.stage1
    for i, target in enumerate(targets):
        head = ha.HeadAdapter(merged.lm_head, head_ranks[i % len(head_ranks)])
        with torch.no_grad():
            for p in head.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=generator))
        ha.save_head(head, out / f"{target}.safetensors", target, merged, fp, stage1)
    return out
