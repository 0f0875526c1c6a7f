"""Decoding: greedy parity with transformers' generate, batching, cache, sampling, stop strings, streaming."""

import pytest
import torch

import phi2
from phi2.generation import generate, sample


def _prompts(vocab_size, lengths=(5, 17, 11, 1)):
    return [torch.randint(0, vocab_size, (n,)).tolist() for n in lengths]


def test_greedy_matches_transformers_generate(hf_reference):
    config, folder, hf = hf_reference
    ours = phi2.load_model(folder)
    new = 24 if config.n_embd > 1000 else 64  # full width: fewer tokens, the same cache paths
    for prompt in _prompts(config.vocab_size, lengths=(23,)):
        ids = torch.tensor([prompt])
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        out = generate(ours, [prompt], new)[0]
        assert out.ids == ref and out.finish == "length"


def test_left_padded_batch_matches_transformers_batch(tiny_cfg, tmp_path):
    from tests.conftest import save_hf_reference
    hf = save_hf_reference(tiny_cfg, tmp_path)
    ours = phi2.load_model(tmp_path)
    prompts = _prompts(tiny_cfg.vocab_size)
    ids, mask = phi2.tokenizer.pad(prompts, pad_id=0)
    ref = hf.generate(ids, attention_mask=mask.long(), max_new_tokens=32, do_sample=False, eos_token_id=None,
                      pad_token_id=0)[:, ids.size(1):]
    assert [c.ids for c in generate(ours, prompts, 32)] == ref.tolist()


def test_batch_equals_one_by_one(tiny_cfg):
    model = phi2.build_model(tiny_cfg).eval()
    prompts = _prompts(tiny_cfg.vocab_size)
    batched = generate(model, prompts, 24)
    for prompt, row in zip(prompts, batched):
        alone = generate(model, [prompt], 24)[0]
        assert row.ids == alone.ids


@torch.inference_mode()
def test_bf16_rows_of_a_batch_step_give_their_solo_logits(tiny_cfg):
    """A decoding step's rows, padded to a row-invariant count, give each row's logits alone, bit for bit."""
    from phi2.generation import Batch
    model = phi2.build_model(tiny_cfg, dtype=torch.bfloat16).eval()
    prompts = _prompts(tiny_cfg.vocab_size, lengths=(4, 13, 7))
    together = Batch(model)
    for prompt in prompts:
        together.join(*together.prefill(prompt, 16))
    together.step(torch.tensor([1, 2, 3]))
    for i, prompt in enumerate(prompts):
        alone = Batch(model)
        alone.join(*alone.prefill(prompt, 16))
        alone.step(torch.tensor([i + 1]))
        assert torch.equal(together.logits(model.lm_head)[i:i + 1], alone.logits(model.lm_head))


@torch.no_grad()
def test_cache_decoding_equals_recomputing_without_cache(tiny_cfg):
    model = phi2.build_model(tiny_cfg).eval()
    prompt = _prompts(tiny_cfg.vocab_size, lengths=(9,))[0]
    seq = list(prompt)
    for _ in range(30):  # no cache: the whole sequence every step
        seq.append(model(torch.tensor([seq]))[0, -1].argmax().item())
    assert generate(model, [prompt], 30)[0].ids == seq[len(prompt):]


def test_sampling_is_reproducible_and_top_k_1_is_greedy(tiny_cfg):
    model = phi2.build_model(tiny_cfg).eval()
    prompts = _prompts(tiny_cfg.vocab_size, lengths=(6, 10))
    run = lambda **kw: [c.ids for c in generate(model, prompts, 20, **kw)]
    assert run(temperature=1.0, seed=3) == run(temperature=1.0, seed=3)
    assert run(temperature=1.0, seed=3) != run(temperature=1.0, seed=4)
    greedy = run()
    assert run(temperature=0.8, top_k=1, seed=5) == greedy
    assert run(temperature=0.8, top_p=1e-6, seed=5) == greedy


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draw = lambda **kw: {sample(logits, 1.0, generator=g, **kw).item() for _ in range(300)}
    assert draw(top_k=2) == {0, 1}
    assert draw(top_p=0.7) == {0, 1}  # 0.5 < 0.7, so the 0.3 token is needed; 0.8 >= 0.7 ends it
    assert draw(top_p=0.45) == {0}
    assert draw() == {0, 1, 2, 3}
    counts = torch.bincount(sample(logits.expand(20000, 4), 1.0, generator=g), minlength=4) / 20000
    torch.testing.assert_close(counts, logits.softmax(-1)[0], atol=0.015, rtol=0)


@pytest.fixture
def tiny_with_tokenizer(tiny_cfg):
    texts = [f"Rewrite {w} so that it is {x} and {y}." for w in ("this", "that", "the plan")
             for x in ("clear", "short", "précis") for y in ("kind", "exact", "über-detailed")] * 10
    tok = phi2.train_tokenizer(texts, tiny_cfg.vocab_size)
    return phi2.build_model(tiny_cfg).eval(), tok


def test_stop_strings_cut_and_are_never_streamed(tiny_with_tokenizer):
    model, tok = tiny_with_tokenizer
    prompt = tok.encode("Rewrite this so that it is")
    full = generate(model, [prompt], 40, tokenizer=tok)[0]
    assert full.finish == "length" and full.text == tok.decode(full.ids)
    stop = full.text[12:15]
    assert len(stop) == 3 and full.text.find(stop) >= 0
    pieces = []
    cut = generate(model, [prompt], 40, tokenizer=tok, stop_strings=[stop, "never-there"],
                   callback=lambda row, text: pieces.append(text))[0]
    assert cut.finish == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    assert "".join(pieces) == cut.text


def test_a_row_that_ends_keeps_text_a_stop_string_might_have_begun(tiny_with_tokenizer):
    model, tok = tiny_with_tokenizer
    prompt = tok.encode("Rewrite this so that it is")
    full = generate(model, [prompt], 40, tokenizer=tok)[0]
    assert full.finish == "length"
    stop = full.text[-1] + "\x00never"  # begins as the text ends, never completes: held back only while it grows
    pieces = []
    held = generate(model, [prompt], 40, tokenizer=tok, stop_strings=[stop],
                    callback=lambda row, text: pieces.append(text))[0]
    assert held.finish == "length" and held.text == full.text and "".join(pieces) == full.text


def test_streaming_gives_the_final_text(tiny_with_tokenizer):
    model, tok = tiny_with_tokenizer
    prompts = [tok.encode("Rewrite the plan"), tok.encode("Rewrite that so that it is clear")]
    streamed = {0: [], 1: []}
    out = generate(model, prompts, 30, tokenizer=tok, callback=lambda row, text: streamed[row].append(text))
    for row, completion in enumerate(out):
        assert "".join(streamed[row]) == completion.text


def test_eos_ends_a_row(tiny_cfg):
    model = phi2.build_model(tiny_cfg).eval()
    prompt = _prompts(tiny_cfg.vocab_size, lengths=(8,))[0]
    free = generate(model, [prompt], 20)[0].ids
    eos = free[5]
    out = generate(model, [prompt], 20, eos_id=eos)[0]
    assert out.finish == "eos" and out.ids == free[: free.index(eos)]


def test_bad_requests(tiny_cfg):
    model = phi2.build_model(tiny_cfg).eval()
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1, 2], []], 4)
    with pytest.raises(ValueError, match="leaves no room to generate in the context of 64"):
        generate(model, [[1] * 64], 4)
    with pytest.raises(ValueError, match="need a tokenizer"):
        generate(model, [[1]], 4, stop_strings=["x"])
    assert len(generate(model, [[1] * 60], 100)[0].ids) == 4  # clipped to the context


def test_compiled_static_cache_decoding_gives_the_eager_tokens(tiny_cfg):
    """generate(compile=...) decodes over a static, masked cache; aot_eager runs that same graph in seconds
    (inductor, generate.py --compile's backend, compiles it to the same ops)."""
    from phi2.generation import compiled
    model = phi2.build_model(tiny_cfg).eval()
    decode = compiled("aot_eager")
    stats = decode.stats
    # 2 rows, then 17: more than 16 rows are padded to 24 whatever this machine's row-invariant counts are
    for prompts in (_prompts(tiny_cfg.vocab_size, lengths=(6, 10)), _prompts(tiny_cfg.vocab_size, lengths=(9,) * 17)):
        eager = [c.ids for c in generate(model, prompts, 15)]
        graphs = stats["graphs"]
        assert [c.ids for c in generate(model, prompts, 15, decode=decode)] == eager
        assert stats["graphs"] == graphs + 1  # a new batch size: one more graph, timed
    graphs = stats["graphs"]
    shorter = [c.ids for c in generate(model, prompts, 12, decode=decode)]  # same batch, same bucket
    assert shorter == [ids[:12] for ids in eager] and stats["graphs"] == graphs  # no new compile


def test_a_temperature_too_small_for_float32_is_greedy_not_nan():
    from phi2.generation import sample
    logits = 10 * torch.randn(4, 300)
    # 0 in float32; subnormal; and 1.5e-38, where logits / t overflows to inf (inf - inf: NaN) unless the
    # largest logit is subtracted first
    for t in (1e-300, 1e-45, 1.5e-38):
        drawn = sample(logits, t, top_p=0.9, generator=torch.Generator().manual_seed(0))
        assert drawn.tolist() == logits.argmax(-1).tolist(), t
