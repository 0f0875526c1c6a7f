"""A thin wrapper over the `tokenizers` library: Phi-2's tokenizer.json, or a small one trained here.

For microsoft/phi-2 this is GPT-2's byte-level BPE plus 38 whitespace-run tokens (50295 in all;
<|endoftext|> = 50256 is both BOS and EOS, and nothing is prepended when encoding). It gives the same ids
as transformers' AutoTokenizer, which tests/test_tokenizer.py checks on the real file. Decoding is the
exact inverse of encoding: HF's lossy `clean_up_tokenization_spaces` is not applied (transformers 5
skips it for BPE tokenizers too). `train_tokenizer` builds the same kind of tokenizer, smaller, for the
offline `tiny` model, which has no released tokenizer.
"""

from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from .config import read_json
from .errors import UsageError
from .files import atomic_path

EOS_TOKEN = "<|endoftext|>"


class TokenizerError(UsageError):
    """A tokenizer file that is missing or cannot be read; the message names it."""


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, eos_token: str = EOS_TOKEN):
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.token_to_id(eos_token)
        if self.eos_id is None:
            raise TokenizerError(f"the tokenizer has no end-of-text token {eos_token!r}; Phi-2's is {EOS_TOKEN!r}")
        self.bos_id = self.eos_id  # Phi-2 uses <|endoftext|> for both, and never prepends it
        self.pad_id = self.eos_id  # no pad token: padded slots are masked, so any id will do

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def encode_batch(self, texts, padding_side="left"):
        """Token ids (B, T) padded to the longest text, and a bool mask (B, T) True on real tokens."""
        return pad([self.encode(t) for t in texts], self.pad_id, padding_side)

    def save(self, folder):
        """Write tokenizer.json into folder (atomically)."""
        with atomic_path(Path(folder) / "tokenizer.json") as tmp:
            self.tokenizer.save(str(tmp))


def pad(rows, pad_id, padding_side="left"):
    """Pad lists of ids into a LongTensor (B, T) and a bool mask (B, T), True on real tokens."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.bool)
    for i, r in enumerate(rows):
        span = slice(T - len(r), T) if padding_side == "left" else slice(0, len(r))
        ids[i, span] = torch.tensor(r, dtype=torch.long)
        mask[i, span] = True
    return ids, mask


def load_tokenizer(path) -> Tokenizer:
    """The tokenizer of a checkpoint folder (or a tokenizer.json path)."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.exists():
        raise TokenizerError(f"{file}: no tokenizer.json; it comes with the model's checkpoint folder "
                             "(copy it there from microsoft/phi-2)")
    try:
        tokenizer = HFTokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception carrying a serde message
        raise TokenizerError(f"{file}: not a valid tokenizer.json ({e}); download it again") from None
    eos = EOS_TOKEN
    config = file.with_name("tokenizer_config.json")
    if config.exists():
        settings = read_json(config, TokenizerError, "download it again or delete it")
        token = settings.get("eos_token") if isinstance(settings, dict) else None
        token = token.get("content") if isinstance(token, dict) else token  # str or {"content": ...}
        if not isinstance(settings, dict) or not isinstance(token, str | None):
            raise TokenizerError(f"{config}: not a tokenizer config (an object whose eos_token is a string); download "
                                 "it again or delete it")
        eos = token or eos
    return Tokenizer(tokenizer, eos)


def train_tokenizer(texts, vocab_size: int) -> Tokenizer:
    """A GPT-2-style byte-level BPE with <|endoftext|>, trained on texts (deterministic)."""
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return Tokenizer(tokenizer)
