"""LoRA against peft (same base, same adapter weights), merging, freezing, and the adapter files both ways."""

import json

import pytest
import torch

import lora
import phi2
from tests.conftest import save_hf_reference

TARGETS = list(lora.DEFAULT_MODULES)


@pytest.fixture
def base(tiny_cfg, tmp_path):
    """A tiny HF checkpoint; returns (folder, transformers model)."""
    return tmp_path / "base", save_hf_reference(tiny_cfg, tmp_path / "base")


def _randomize(model):
    """Give every LoRA B a non-zero value, so that the adapter changes the output."""
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            m.lora_B.normal_(0, 0.05)


def _peft_model(hf, rank=8, alpha=16):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")
    pm = peft.get_peft_model(hf, cfg).eval()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.05)
    return pm


@torch.no_grad()
def test_adapter_from_peft_gives_peft_logits(base, tmp_path):
    folder, hf = base
    pm = _peft_model(hf)
    pm.save_pretrained(tmp_path / "adapter")
    ours = phi2.load_model(folder)
    config = lora.load_adapter(ours, tmp_path / "adapter")
    assert config["r"] == 8 and len(lora.lora_modules(ours)) == 6 * 2
    x = torch.randint(0, 256, (2, 19))
    ref = pm(input_ids=x).logits
    assert (ours(x) - ref).abs().max() <= 1e-5
    with pm.disable_adapter():
        assert (pm(input_ids=x).logits - ref).abs().max() > 1e-3  # the adapter does change the output


@torch.no_grad()
def test_adapter_saved_here_loads_in_peft(base, tmp_path):
    peft = pytest.importorskip("peft")
    folder, hf = base
    ours = lora.inject(phi2.load_model(folder), rank=4, alpha=12.0)
    _randomize(ours)
    lora.save_adapter(ours, tmp_path / "adapter", base_path=folder)
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["lora_alpha"] == 12.0 and saved["base_model_name_or_path"] == str(folder)
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    x = torch.randint(0, 256, (2, 19))
    assert (pm(input_ids=x).logits - ours(x)).abs().max() <= 1e-5


@torch.no_grad()
def test_lora_starts_as_the_base_and_merges_exactly(tiny_cfg):
    model = phi2.build_model(tiny_cfg).eval()
    x = torch.randint(0, 256, (2, 12))
    before = model(x)
    lora.inject(model, rank=4, alpha=8.0)
    assert torch.equal(model(x), before)  # B = 0
    _randomize(model)
    unmerged = model(x)
    assert not torch.allclose(unmerged, before)
    lora.merge(model)
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=0)
    lora.unmerge(model)
    torch.testing.assert_close(model(x), unmerged, atol=1e-6, rtol=0)
    torch.testing.assert_close(model.layers[0].mlp.fc1.weight, phi2.build_model(tiny_cfg).layers[0].mlp.fc1.weight,
                               atol=1e-6, rtol=0)


def test_only_lora_trains_and_the_base_stays_bit_identical(tiny_cfg):
    model = lora.inject(phi2.build_model(tiny_cfg).train(), rank=4, alpha=8.0, dropout=0.1)
    trainable = lora.trainable_parameters(model)
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
    assert len(trainable) == 2 * 6 * tiny_cfg.n_layer
    base_before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    x = torch.randint(0, 256, (2, 12))
    for _ in range(3):
        model(x).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), n
    assert set(model.state_dict()) - set(phi2.build_model(tiny_cfg).state_dict()) == {
        f"{m}.{ab}" for m in lora.lora_modules(model) for ab in ("lora_A", "lora_B")}


def test_lora_init_matches_peft_distribution(tiny_cfg):
    model = lora.inject(phi2.build_model(tiny_cfg), rank=8, alpha=16.0)
    A = model.layers[0].mlp.fc1.lora_A
    bound = 1 / tiny_cfg.n_embd ** 0.5  # kaiming_uniform(a=sqrt(5)) on (r, in): U(-1/sqrt(in), 1/sqrt(in))
    assert A.abs().max() <= bound and A.abs().max() > 0.8 * bound
    assert torch.equal(model.layers[0].mlp.fc1.lora_B, torch.zeros_like(model.layers[0].mlp.fc1.lora_B))


def test_adapter_for_another_base_is_refused(tiny_cfg, tmp_path):
    import dataclasses
    model = lora.inject(phi2.build_model(tiny_cfg), rank=4, alpha=8.0)
    lora.save_adapter(model, tmp_path / "a", base_fingerprint=phi2.weights.fingerprint(phi2.build_model(tiny_cfg)))
    # same shapes, other weights: the fingerprint tells
    with pytest.raises(lora.AdapterError, match="trained on another base model"):
        lora.load_adapter(phi2.build_model(tiny_cfg, seed=1), tmp_path / "a")
    # other shapes
    wider = dataclasses.replace(tiny_cfg, intermediate_size=128)
    lora.save_adapter(model, tmp_path / "b")
    with pytest.raises(lora.AdapterError,
                       match=r"layers.0.mlp.fc1.lora_B.weight' has shape \(256, 4\), this base needs \(128, 4\)"):
        lora.load_adapter(phi2.build_model(wider), tmp_path / "b")
    # other module names (a deeper model has layers this adapter lacks)
    with pytest.raises(lora.AdapterError, match="lacks tensor"):
        lora.load_adapter(phi2.build_model(dataclasses.replace(tiny_cfg, n_layer=3)), tmp_path / "b")
    # the same base is fine
    lora.load_adapter(phi2.build_model(tiny_cfg), tmp_path / "a")


def test_unsupported_adapter_configs(tiny_cfg, tmp_path):
    model = lora.inject(phi2.build_model(tiny_cfg), rank=4, alpha=8.0)
    lora.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    for change, message in [({"use_dora": True}, "use_dora=True is not supported"),
                            ({"peft_type": "IA3"}, "only 'LORA' adapters are read"),
                            ({"target_modules": ".*proj"}, r"'target_modules' is \".\*proj\"; it must be a non-empty"),
                            ({"target_modules": ["c_attn"]}, r"no module named \['c_attn'\] in Phi-2")]:
        path.write_text(json.dumps({**config, **change}))
        with pytest.raises(lora.AdapterError, match=message):
            lora.load_adapter(phi2.build_model(tiny_cfg), tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    path.write_text(json.dumps(config))
    with pytest.raises(lora.AdapterError, match="adapter_model.bin is not read"):
        lora.load_adapter(phi2.build_model(tiny_cfg), tmp_path)


def test_lora_gradients_match_peft(base):
    folder, hf = base
    pm = _peft_model(hf)
    ours = phi2.load_model(folder)
    lora.inject(ours, rank=8, alpha=16.0)
    with torch.no_grad():  # copy peft's adapter weights into ours
        for name, m in lora.lora_modules(ours).items():
            m.lora_A.copy_(pm.get_submodule(f"base_model.model.model.{name}.lora_A.default").weight)
            m.lora_B.copy_(pm.get_submodule(f"base_model.model.model.{name}.lora_B.default").weight)
    x = torch.randint(0, 256, (2, 19))
    labels = x.clone()
    labels[:, :6] = -100
    pm.train()
    pm(input_ids=x, labels=labels).loss.backward()
    ours.train()
    loss, n = ours.loss(x, labels)
    (loss / n).backward()
    for name, m in lora.lora_modules(ours).items():
        ref = pm.get_submodule(f"base_model.model.model.{name}.lora_B.default").weight.grad
        torch.testing.assert_close(m.lora_B.grad, ref, atol=1e-6, rtol=1e-4, msg=name)
        ref = pm.get_submodule(f"base_model.model.model.{name}.lora_A.default").weight.grad
        torch.testing.assert_close(m.lora_A.grad, ref, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("change, message", [
    ({"r": True}, "'r' is true; it must be a positive integer"),
    ({"lora_alpha": float("nan")}, "'lora_alpha' is NaN; it must be a positive number"),
    ({"lora_alpha": float("inf")}, "'lora_alpha' is Infinity; it must be a positive number"),
    ({"lora_dropout": "0.1"}, "'lora_dropout' is \"0.1\"; it must be a number in \\[0, 1\\)"),
    ({"lora_dropout": 1.5}, "'lora_dropout' is 1.5; it must be a number in \\[0, 1\\)"),
    ({"use_rslora": "yes"}, "'use_rslora' is \"yes\"; it must be true or false"),
    ({"target_modules": [["q_proj"]]}, "'target_modules' is \\[\\[\"q_proj\"\\]\\]; it must be a non-empty list"),
    ({"target_modules": []}, "'target_modules' is \\[\\]; it must be a non-empty list"),
    ({"base_model_name_or_path": 7}, "'base_model_name_or_path' is 7; it must be a folder name"),
    (b"\xff\xfe{}", "not UTF-8 text"),
    (b"[" * 100_000, "JSON nested too deeply"),
    (b'{"r": ' + b"1" * 5000 + b"}", "not readable as JSON"),
    (None, "cannot be read"),  # a folder where adapter_config.json should be
])
def test_every_adapter_config_field_is_checked_in_one_line(tiny_cfg, tmp_path, change, message):
    lora.save_adapter(lora.inject(phi2.build_model(tiny_cfg), rank=4, alpha=8.0), tmp_path)
    path = tmp_path / "adapter_config.json"
    if isinstance(change, dict):
        path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    elif change is None:
        path.unlink()
        path.mkdir()
    else:
        path.write_bytes(change)
    with pytest.raises(lora.AdapterError, match=message) as e:
        lora.load_adapter(phi2.build_model(tiny_cfg), tmp_path)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)
