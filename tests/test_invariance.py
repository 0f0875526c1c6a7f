"""Batch invariance: a prompt's tokens depend only on the prompt, never on which others share its batch.

Random prompts of mixed lengths are decoded alone, then in batches of 3 and 8 (generate()) and through the
serving engine with rows joining and leaving, in fp32, bf16 and fp16; every row's ids must be its solo ids,
bit for bit. A random-weight model's logits are flat, so one rounding step in any row flips its argmax
within a few tokens: these tests fail on attention over a left-padded, masked cache (what the server and
generate() did before), which differs from the unpadded span by a bf16 step.
"""

import pytest
import torch

import phi2
from phi2.fused import ONEDNN_FP32, FastLinear
from phi2.generation import generate, invariant_rows
from serving.engine import Engine, Request
from support import hardware

# full width: 2560 wide, 32 heads of 80 (the attention kernels' blocking is Phi-2's); a narrow model with many
# heads checks the same where bf16 is emulated (AVX2-only CPUs, where the full width would take minutes)
CONFIGS = {
    "phi-2-2layer": phi2.Phi2Config.from_name("phi-2", n_layer=2, vocab_size=4096, resid_pdrop=0.0),
    "narrow": phi2.Phi2Config(n_layer=2, n_head=16, n_kv_head=16, n_embd=256, intermediate_size=1024,
                              vocab_size=1024, block_size=256, rotary_dim=8, resid_pdrop=0.0),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def new_tokens(model) -> int:
    """Tokens to decode: 12 (within which masked-padding attention flipped rows at full width in bf16), or 6
    in fp32 at full width, whose steps are the slowest and whose rounding steps are the smallest."""
    full_fp32 = model.config.n_embd > 1000 and model.lm_head.weight.dtype == torch.float32
    return 6 if full_fp32 else 12


def model_for(name, precision):
    if name == "phi-2-2layer" and precision != "fp32" and not hardware.cpu_bf16_native():
        pytest.skip("full width in half precision needs native bf16 (AVX-512 BF16 or AMX); the narrow model checks it")
    if name == "phi-2-2layer" and precision == "fp16":
        pytest.skip("fp16 at full width: slow on CPUs (the narrow model checks fp16)")
    return phi2.build_model(CONFIGS[name], dtype=DTYPES[precision], seed=1).eval()


def prompts_for(config):
    """8 prompts of 1 to 88 tokens (1 to 40 at full width, to keep the suite fast)."""
    generator = torch.Generator().manual_seed(7)
    lengths = [3, 41, 17, 88, 9, 60, 1, 29] if config.n_embd < 1000 else [3, 21, 9, 40, 5, 30, 1, 14]
    return [torch.randint(0, config.vocab_size, (k,), generator=generator).tolist() for k in lengths]


@pytest.mark.parametrize("precision", list(DTYPES))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_generate_gives_every_row_its_solo_ids_at_any_batch_size(name, precision):
    model = model_for(name, precision)
    prompts, new = prompts_for(model.config), new_tokens(model)
    solo = [generate(model, [p], new)[0].ids for p in prompts]
    assert len({tuple(ids) for ids in solo}) > 1  # the rows differ: a batch mixing them is a real test
    for size in (3, 8):
        batched = [c.ids for i in range(0, len(prompts), size) for c in generate(model, prompts[i:i + size], new)]
        assert batched == solo, f"batch size {size}"
    if name == "narrow":  # seeded sampling too: prompt i samples with seed + i, whatever batch it falls in
        sampled = [generate(model, [p], new, temperature=1.0, seed=5 + i)[0].ids for i, p in enumerate(prompts)]
        assert [c.ids for c in generate(model, prompts, new, temperature=1.0, seed=5)] == sampled


class _Ids:
    """A tokenizer for ids only: no EOS, no text, no template (the engine's rows run to their length)."""
    eos_id = -1

    @staticmethod
    def encode(text):
        return []

    @staticmethod
    def decode(ids):
        return ""


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_engine_gives_every_request_its_solo_ids_as_rows_join_and_leave(name, precision):
    model = model_for(name, precision)
    prompts, new = prompts_for(model.config), new_tokens(model)
    engine = Engine(model, _Ids(), {"base": None}, max_batch=3)

    def run(requests):
        engine.queue.extend(requests)
        engine.run()
        return [r.out for r in requests]

    # lengths of new, 2/3 and 1/3 of it: rows finish at different steps, and the next request joins the freed row
    make = lambda: [Request(p, "base", new - new // 3 * (i % 3), temperature=1.0 if i % 4 == 3 else 0.0, seed=i)
                    for i, p in enumerate(prompts)]
    solo = [run([r])[0] for r in make()]
    assert run(make()) == solo


@pytest.mark.parametrize("shape", [(96, 160),  # F.linear's path; fp32's oneDNN path (phi2/fused.py):
                                   pytest.param((1024, 1536), marks=pytest.mark.skipif(
                                       not ONEDNN_FP32, reason="oneDNN's fp32 path is for x86 CPUs with oneDNN"))])
def test_row_counts_are_measured_per_layer_shape(shape):
    """invariant_rows names, for a Linear, the row counts at which each row comes out as at 64 rows; a count it
    returns does so, on this machine, for another input as well."""
    layer = FastLinear(*shape)
    counts = invariant_rows(layer, shape[0])
    assert 64 in counts
    x = torch.randn(64, shape[0])
    with torch.inference_mode():
        reference = layer(x)
        for n in counts:
            assert torch.equal(layer(x[:n]), reference[:n])
