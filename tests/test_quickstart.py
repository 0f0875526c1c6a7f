"""The mechanism, end to end on the tiny preset: after stage 1 and a head per bundled style, each head's
greedy rewrites of held-out prompts are closer (ROUGE-L) to its own style's references than the other
head's are."""

import contextlib
import io

import pytest

import quickstart


def test_rouge_l_by_hand():
    assert quickstart.rouge_l("the cat sat", "the cat sat") == 1.0
    assert quickstart.rouge_l("a b c d", "x y") == 0.0
    # LCS of "a b c d" and "a c d e f" is "a c d": precision 3/4, recall 3/5
    assert quickstart.rouge_l("a b c d", "A c d e f") == pytest.approx(2 * 0.75 * 0.6 / (0.75 + 0.6))
    assert quickstart.rouge_l("", "a") == 0.0


def test_held_out_prompts_share_both_styles():
    rows = quickstart.held_out()
    assert len(rows) >= 10 and all(set(refs) == set(quickstart.STYLES) for _, refs in rows)
    assert all(refs["structured"].startswith("Role:") and "Role:" not in refs["concise"] for _, refs in rows)


def test_each_head_pulls_rewrites_towards_its_style(tmp_path):
    with contextlib.redirect_stdout(io.StringIO()):
        # fewer steps than the defaults (a minute and a half on one AVX2 core); the margins seen are 0.07 and
        # more
        scores = quickstart.run(tmp_path / "qs", base_steps=70, sft_epochs=2, quiet=True)
    margin = 0.02
    assert scores["concise", "concise"] > scores["structured", "concise"] + margin
    assert scores["structured", "structured"] > scores["concise", "structured"] + margin
