"""Prompts as chat turns, and where an instruct model's answer ends.

An instruct model is asked through its chat template: the item's prompt is the user's message, the
template adds the role markers (and the model's BOS, when it has one), and the answer is what the
model writes in the assistant turn. The rendered text already holds every special token the model
expects, so it is tokenised without adding special tokens again: a second BOS shifts every position
and changes answers.

The turn ends at a token that need not be the tokenizer's EOS (Llama 3 ends turns with
``<|eot_id|>``, its EOS is ``<|end_of_text|>``; Gemma with ``<end_of_turn>``), so generation stops at
every id in :func:`end_token_ids`: the tokenizer's EOS, every ``eos_token_id`` of the model's
generation config, and the end-of-turn token read off the template itself.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

SENTINEL = "evomerge-answer-sentinel"


def _check_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"chat_template: true, but the tokenizer of {getattr(tokenizer, 'name_or_path', '?')!r} "
                         f"has no chat template; set chat_template: false, or use the instruct model's tokenizer")


def chat_messages(prompt: str, system_prompt: str | None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    return messages + [{"role": "user", "content": prompt}]


def render_chat(tokenizer: Any, prompt: str, system_prompt: str | None = None) -> str:
    """The prompt as a user turn (after an optional system turn), ending with the assistant's header."""
    _check_template(tokenizer)
    text = tokenizer.apply_chat_template(chat_messages(prompt, system_prompt), tokenize=False,
                                         add_generation_prompt=True)
    return str(text)


def chat_ids(tokenizer: Any, prompt: str, system_prompt: str | None = None) -> list[int]:
    """Token ids of :func:`render_chat`, with no special tokens added on top of the template's own."""
    return list(tokenizer(render_chat(tokenizer, prompt, system_prompt), add_special_tokens=False)["input_ids"])


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The special token the template writes right after an assistant message, or None.

    Read off the template (render a conversation with a known assistant reply and look at the first
    token after it), so no list of model families' end tokens is needed.
    """
    _check_template(tokenizer)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": SENTINEL}]
    try:
        text = str(tokenizer.apply_chat_template(messages, tokenize=False))
    except Exception:  # a template that refuses an assistant turn (rare) has no readable end token
        return None
    at = text.find(SENTINEL)
    if at < 0:
        return None
    tail = tokenizer(text[at + len(SENTINEL):], add_special_tokens=False)["input_ids"]
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    special |= set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return int(tail[0]) if tail and tail[0] in special else None


def end_token_ids(tokenizer: Any, model: Any = None, chat: bool = False) -> list[int]:
    """Every id that ends an answer: the tokenizer's EOS, the generation config's ``eos_token_id``
    (an int or a list), and with ``chat`` the template's end-of-turn token; first the EOS, no repeats."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    if extra is not None:
        ids.extend(int(e) for e in ([extra] if isinstance(extra, int) else extra))
    if chat:
        eot = end_of_turn_id(tokenizer)
        if eot is not None:
            ids.append(eot)
    out = list(dict.fromkeys(ids))
    if not out:
        raise ValueError(f"the tokenizer of {getattr(tokenizer, 'name_or_path', '?')!r} has no EOS and the model's "
                         f"generation config names none; generation needs an end token")
    return out


def stop_checker(tokenizer: Any, stop: Sequence[str]) -> Callable[[list[int]], bool] | None:
    """A per-row test 'has the text so far reached a stop string' for greedy_generate, or None."""
    stops = [s for s in stop if s]
    if not stops:
        return None

    def reached(tokens: list[int]) -> bool:
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        return any(s in text for s in stops)

    return reached
