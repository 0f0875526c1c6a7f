"""phi2: Microsoft Phi-2 written from scratch in PyTorch, loading Hugging Face safetensors checkpoints.

    model = phi2.load_model("checkpoints/phi-2", dtype=torch.bfloat16)
    tok = phi2.load_tokenizer("checkpoints/phi-2")
    logits = model(torch.tensor([tok.encode("Hello")]))  # (B, T, vocab_size)
"""

import torch

from .config import PRESETS, ConfigError, Phi2Config
from .model import Phi2
from .tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from .weights import CheckpointError, load_model, save_hf_checkpoint


def build_model(config="tiny", dtype=torch.float32, seed=0, device="cpu") -> Phi2:
    """A random-weight model from a preset name or a Phi2Config, initialised as transformers does, then
    moved to device (initialised on the CPU, so a seed gives the same numbers on every device)."""
    if isinstance(config, str):
        config = Phi2Config.from_name(config)
    with torch.device("meta"):
        model = Phi2(config)
    model = model.to(dtype).to_empty(device="cpu")
    model.init_weights(torch.Generator().manual_seed(seed))
    return model.to(device)


__all__ = [
    "PRESETS", "CheckpointError", "ConfigError", "Phi2", "Phi2Config", "Tokenizer",
    "build_model", "load_model", "load_tokenizer", "save_hf_checkpoint", "train_tokenizer",
]
