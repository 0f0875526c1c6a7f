"""Phi-2 configuration: one dataclass, the named presets, and the reader for a checkpoint's config.json.

Reference: transformers/models/phi/configuration_phi.py (PhiConfig) and microsoft/phi-2's config.json.
Both spellings of the rotary keys are read: top level (transformers 4.x, the real Phi-2 file) and inside
`rope_parameters` (transformers 5). Left out on purpose, each with a one-line error: the old
MixFormerSequential remote-code format, qk_layernorm, tied embeddings and RoPE scaling (Phi-2 has none).
"""

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError


class ConfigError(UsageError):
    """A config.json that cannot describe a Phi-2 model; the message names the file and the key."""


def parse_json(text: str, where, error=ConfigError, fix: str = "correct it", line: bool = True):
    """The JSON value in text, or one line (error) saying where and why it is not JSON: a syntax error (with its
    line, unless where names one already: line=False), nesting too deep for the parser, or a number too long
    for Python's integer conversion."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{where}{f':{e.lineno}' if line else ''}: not valid JSON ({e.msg}); {fix}") from None
    except RecursionError:
        raise error(f"{where}: JSON nested too deeply to read; {fix}") from None
    except ValueError as e:  # an integer of more than 4300 digits
        raise error(f"{where}: not readable as JSON ({str(e).split(':')[0]}); {fix}") from None


def read_json(path, error=ConfigError, fix: str = "correct it", missing: str = ""):
    """The JSON value in a user's file, or one line (error) naming the file: missing (then `missing` says what
    belongs there), a folder, unreadable, not UTF-8, or not JSON as parse_json says."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: no such file{f'; {missing}' if missing else ''}") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text, so not JSON; {fix}") from None
    except OSError as e:  # a folder, no permission, an I/O error
        raise error(f"{path}: cannot be read ({e.strerror or e}); {fix}") from None
    return parse_json(text, path, error, fix)


@dataclass(frozen=True)
class Phi2Config:
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int = 32  # < n_head means grouped-query attention
    n_embd: int = 2560
    intermediate_size: int = 10240
    vocab_size: int = 51200
    block_size: int = 2048  # max_position_embeddings
    rotary_dim: int = 32  # partial_rotary_factor * head_dim: RoPE touches the first 32 of 80 dims
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    embd_pdrop: float = 0.0
    resid_pdrop: float = 0.1
    attn_pdrop: float = 0.0

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ConfigError(f"rotary_dim {self.rotary_dim} must be even and in (0, head_dim={self.head_dim}]")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_name(cls, name: str, **overrides) -> "Phi2Config":
        """A preset by exact name, with optional field overrides."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; valid names: {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def to_hf_dict(self) -> dict:
        """The transformers-5 `config.json` fields for this config (used to build reference models)."""
        return {
            "model_type": "phi",
            "architectures": ["PhiForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.n_embd,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": self.n_head,
            "num_key_value_heads": self.n_kv_head,
            "resid_pdrop": self.resid_pdrop,
            "embd_pdrop": self.embd_pdrop,
            "attention_dropout": self.attn_pdrop,
            "hidden_act": "gelu_new",
            "max_position_embeddings": self.block_size,
            "layer_norm_eps": self.norm_eps,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": self.rope_base,
                "partial_rotary_factor": self.rotary_dim / self.head_dim,
            },
            "qk_layernorm": False,
            "tie_word_embeddings": False,
        }

    @classmethod
    def from_hf_json(cls, path) -> "Phi2Config":
        """Read a transformers `config.json` (model_type "phi"), either generation of its format."""
        path = Path(path)
        hf = read_json(path, ConfigError, "download the checkpoint's config.json again",
                       missing="a Phi-2 checkpoint folder holds a config.json")
        return cls._from_hf_dict(hf, source=str(path))

    @classmethod
    def _from_hf_dict(cls, hf: dict, source: str) -> "Phi2Config":
        def fail(msg):
            raise ConfigError(f"{source}: {msg}")

        if not isinstance(hf, dict):
            fail(f"not a JSON object but {type(hf).__name__}; a checkpoint's config.json is an object of settings")
        for key, kind in (("architectures", list), ("rope_parameters", dict)):
            if hf.get(key) is not None and not isinstance(hf[key], kind):
                fail(f"{key!r} is {hf[key]!r}; it must be a JSON {'list' if kind is list else 'object'}")
        model_type = hf.get("model_type")
        if model_type == "mixformer-sequential" or "MixFormerSequentialForCausalLM" in (hf.get("architectures") or []):
            fail("the old MixFormerSequentialForCausalLM remote-code format is not supported; "
                 "download the current microsoft/phi-2 revision, whose config.json has model_type 'phi'")
        if model_type != "phi":
            fail(f"model_type is {model_type!r}, expected 'phi' (a transformers PhiForCausalLM checkpoint)")

        # The rotary keys live at the top level (transformers 4.x) or in rope_parameters (transformers 5).
        rope = dict(hf.get("rope_parameters") or {})
        for key in ("rope_theta", "partial_rotary_factor"):
            if key in hf and key in rope and hf[key] != rope[key]:
                fail(f"{key} is {hf[key]} at the top level but {rope[key]} in rope_parameters")
            if key in hf:
                rope[key] = hf[key]
        if hf.get("rope_scaling") or rope.get("rope_type", "default") != "default":
            fail("RoPE scaling is not supported (Phi-2 uses plain RoPE: rope_type 'default', rope_scaling null)")

        # An absent key takes transformers' default only where that default is also Phi-2's value;
        # where they differ (hidden_size: 2048 vs 2560, ...) guessing either would be silent, so we stop.
        phi2 = PRESETS["phi-2"].to_hf_dict()
        phi2.update(phi2.pop("rope_parameters"))

        def get(key, table=hf):
            if table.get(key) is not None:
                return table[key]
            if _HF_DEFAULTS[key] != phi2[key]:
                where = " in rope_parameters or at the top level" if table is rope else ""
                fail(f"{key!r} is missing{where}; transformers would assume {_HF_DEFAULTS[key]!r} but "
                     f"Phi-2 has {phi2[key]!r}, so write the value into config.json")
            return phi2[key]

        if get("hidden_act") not in ("gelu_new", "gelu_pytorch_tanh"):
            fail(f"hidden_act {hf['hidden_act']!r} is not supported; Phi-2 uses gelu with the tanh "
                 "approximation ('gelu_new' or 'gelu_pytorch_tanh')")
        if get("qk_layernorm"):
            fail("qk_layernorm is not implemented (Phi-2 does not use it)")
        if get("tie_word_embeddings"):
            fail("tied input and output embeddings are not supported (Phi-2's lm_head is separate)")

        def number(key, value, kind):  # a string or a bool where config.json needs a number stops here
            ok = isinstance(value, int) if kind is int else isinstance(value, (int, float))
            if not ok or isinstance(value, bool) or (kind is int and value <= 0) or not value == value:
                what = "a positive integer" if kind is int else "a number"
                fail(f"{key!r} is {value!r}; it must be {what}")
            return value

        for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size",
                    "max_position_embeddings"):
            number(key, get(key), int)
        if hf.get("num_key_value_heads") is not None:
            number("num_key_value_heads", hf["num_key_value_heads"], int)
        for key in ("layer_norm_eps", "resid_pdrop", "embd_pdrop", "attention_dropout"):
            number(key, get(key), float)
        for key in ("rope_theta", "partial_rotary_factor"):
            number(key, get(key, rope), float)
        n_embd, n_head = get("hidden_size"), get("num_attention_heads")
        head_dim = n_embd // n_head
        if hf.get("head_dim") not in (None, head_dim):
            fail(f"head_dim {hf['head_dim']} != hidden_size / num_attention_heads = {head_dim}")
        # int() truncates exactly as transformers does: int(80 * 0.4) == 32
        rotary_dim = int(head_dim * get("partial_rotary_factor", rope))
        try:
            return cls(
                n_layer=get("num_hidden_layers"),
                n_head=n_head,
                n_kv_head=hf.get("num_key_value_heads") or n_head,  # null means no grouping
                n_embd=n_embd,
                intermediate_size=get("intermediate_size"),
                vocab_size=get("vocab_size"),
                block_size=get("max_position_embeddings"),
                rotary_dim=rotary_dim,
                rope_base=float(get("rope_theta", rope)),
                norm_eps=get("layer_norm_eps"),
                embd_pdrop=get("embd_pdrop"),
                resid_pdrop=get("resid_pdrop"),
                attn_pdrop=get("attention_dropout"),
            )
        except ConfigError as e:
            fail(str(e))


# transformers' PhiConfig defaults, which apply when a key is absent from config.json.
_HF_DEFAULTS = {
    "vocab_size": 51200, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
    "num_attention_heads": 32, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attention_dropout": 0.0,
    "hidden_act": "gelu_new", "max_position_embeddings": 2048, "layer_norm_eps": 1e-5,
    "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "qk_layernorm": False, "tie_word_embeddings": False,
}

PRESETS = {
    # microsoft/phi-2: 2.7B parameters
    "phi-2": Phi2Config(),
    # a few-million-parameter model for tests and the offline demo (its tokenizer is trained on data/)
    "tiny": Phi2Config(
        n_layer=4, n_head=4, n_kv_head=4, n_embd=128, intermediate_size=512, vocab_size=2048,
        block_size=512, rotary_dim=16, resid_pdrop=0.0,
    ),
}
