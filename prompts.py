"""The prompt template, in one place for training (both stages) and generation.

The papers' best training text is `System: Fix the following prompt. Prompt: {bad}. Answer: {good}`:
the model reads everything up to "Answer:" and learns to write " {good}" followed by EOS.
"""

TEMPLATE = "System: Fix the following prompt. Prompt: {prompt}. Answer:"


def format_prompt(prompt: str) -> str:
    """The text the model continues: the template up to and including "Answer:"."""
    return TEMPLATE.format(prompt=prompt.strip())


def format_answer(improved: str) -> str:
    """The text the model learns to write after "Answer:" (EOS is appended as a token, not as text)."""
    return " " + improved.strip()
