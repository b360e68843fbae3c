"""How a prompt is shown to the model: the chat template, truncation, the end of an answer.

Training (``train/examples.py``), generation and serving all format prompts
through these functions, so a user's query reads the same to the model
whichever path it comes by.
"""

from __future__ import annotations

SYSTEM_PROMPT = "You are a personalized assistant."


def format_prompt(tok, prompt: str) -> str:
    """The prompt as the model sees it: the chat template's user turn, ready for the answer."""
    if getattr(tok, "chat_template", None):
        msgs = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return prompt + "\n"


def _has_token(tok, token: str) -> bool:
    """Whether ``token`` is in the vocabulary (``tok.get_vocab()`` builds a 49k-entry dict: ~20 ms a call)."""
    tid = tok.convert_tokens_to_ids(token)
    return tid is not None and (tid != tok.unk_token_id or token == tok.unk_token)


def end_of_answer(tok) -> str:
    """Text that closes an answer: the chat end-of-turn token, else EOS."""
    if getattr(tok, "chat_template", None) and _has_token(tok, "<|im_end|>"):
        return "<|im_end|>"
    return tok.eos_token or ""


def encode_prompt(tok, prompt: str, max_prompt_tokens: int) -> list[int]:
    """Token ids of a formatted prompt, the prompt text cut to ``max_prompt_tokens`` tokens."""
    ids = tok(prompt, add_special_tokens=False).input_ids
    if len(ids) > max_prompt_tokens:
        prompt = tok.decode(ids[:max_prompt_tokens])
    return tok(format_prompt(tok, prompt), add_special_tokens=False).input_ids
