"""Reading config.json in both spellings, the presets, and each refusal with its message."""

import json

import pytest

from phi2 import PRESETS, ConfigError, Phi2Config
from tests.conftest import PHI2_FILES, needs_shared


@needs_shared()
def test_real_phi2_config_is_the_preset():
    assert Phi2Config.from_hf_json(PHI2_FILES / "config.json") == PRESETS["phi-2"]


@needs_shared()
def test_mixformer_format_is_refused():
    with pytest.raises(ConfigError, match="MixFormerSequentialForCausalLM remote-code format is not supported"):
        Phi2Config.from_hf_json(PHI2_FILES / "config.mixformer-sequential.json")


def _write(tmp_path, **changes):
    """Phi-2's config.json as transformers 4.37 wrote it (rotary keys at the top level), edited."""
    hf = {
        "architectures": ["PhiForCausalLM"], "model_type": "phi", "attention_dropout": 0.0, "embd_pdrop": 0.0,
        "hidden_act": "gelu_new", "hidden_size": 2560, "intermediate_size": 10240, "layer_norm_eps": 1e-05,
        "max_position_embeddings": 2048, "num_attention_heads": 32, "num_hidden_layers": 32,
        "num_key_value_heads": 32, "partial_rotary_factor": 0.4, "qk_layernorm": False, "resid_pdrop": 0.1,
        "rope_scaling": None, "rope_theta": 10000.0, "tie_word_embeddings": False, "vocab_size": 51200,
    }
    for key, value in changes.items():
        if value is None:
            hf.pop(key)
        else:
            hf[key] = value
    path = tmp_path / "config.json"
    path.write_text(json.dumps(hf, indent=2))
    return path


def test_both_rotary_spellings_read_the_same(tmp_path):
    old = Phi2Config.from_hf_json(_write(tmp_path))
    new = Phi2Config.from_hf_json(_write(
        tmp_path, partial_rotary_factor=None, rope_theta=None, rope_scaling=None,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.4}))
    assert old == new == PRESETS["phi-2"]
    assert old.rotary_dim == 32 and old.head_dim == 80


def test_to_hf_dict_round_trips(tmp_path):
    for config in [PRESETS["phi-2"], PRESETS["tiny"], Phi2Config.from_name("tiny", n_kv_head=2)]:
        path = tmp_path / "c.json"
        path.write_text(json.dumps(config.to_hf_dict()))
        assert Phi2Config.from_hf_json(path) == config


def test_absent_keys_fall_back_only_where_transformers_agrees_with_phi2(tmp_path):
    # absent, and transformers' default equals Phi-2's: taken
    cfg = Phi2Config.from_hf_json(_write(tmp_path, rope_theta=None, layer_norm_eps=None, num_key_value_heads=None))
    assert cfg == PRESETS["phi-2"]
    # absent, and transformers would assume something else: refused, naming both values
    with pytest.raises(ConfigError,
                       match=r"'hidden_size' is missing; transformers would assume 2048 but Phi-2 has 2560"):
        Phi2Config.from_hf_json(_write(tmp_path, hidden_size=None))
    with pytest.raises(ConfigError, match="'partial_rotary_factor' is missing in rope_parameters or at the top level"):
        Phi2Config.from_hf_json(_write(tmp_path, partial_rotary_factor=None))


@pytest.mark.parametrize("changes, message", [
    ({"hidden_act": "relu"}, "hidden_act 'relu' is not supported"),
    ({"qk_layernorm": True}, "qk_layernorm is not implemented"),
    ({"tie_word_embeddings": True}, "tied input and output embeddings are not supported"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "RoPE scaling is not supported"),
    ({"model_type": "llama"}, "model_type is 'llama', expected 'phi'"),
    ({"rope_parameters": {"rope_theta": 500.0}}, "rope_theta is 10000.0 at the top level but 500.0 in rope_parameters"),
    ({"num_key_value_heads": 5}, "n_head 32 is not a multiple of n_kv_head 5"),
])
def test_unsupported_configs_fail_in_one_line(tmp_path, changes, message):
    path = _write(tmp_path, **changes)
    with pytest.raises(ConfigError, match=message) as e:
        Phi2Config.from_hf_json(path)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


def test_bad_json_names_the_line(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{\n  "model_type": "phi",\n  "hidden_size": 2560,,\n}')
    with pytest.raises(ConfigError, match=r"config.json:3: not valid JSON"):
        Phi2Config.from_hf_json(path)


def test_presets_by_exact_name():
    assert Phi2Config.from_name("phi-2", n_layer=2).n_layer == 2
    with pytest.raises(ConfigError, match="unknown preset 'phi2'; valid names: phi-2, tiny"):
        Phi2Config.from_name("phi2")


@pytest.mark.parametrize("content, message", [
    (b'{"model_type": "phi", "hidden_size": 2560, "note": "caf\xe9"}', "not UTF-8 text, so not JSON"),  # Latin-1
    (b"[" * 100_000 + b"]" * 100_000, "JSON nested too deeply to read"),
    (b'{"hidden_size": ' + b"9" * 5000 + b"}", "not readable as JSON"),
    (None, "cannot be read"),  # a folder named config.json
])
def test_unreadable_config_json_is_one_line(tmp_path, content, message):
    path = tmp_path / "config.json"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as e:
        Phi2Config.from_hf_json(path)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)
