"""Batched greedy generation with a KV cache, for any transformers causal LM.

A hand-written loop rather than ``model.generate``: for the tiny zoo models the per-step overhead of
``generate`` dominates, and the loop is short. Prompts are sorted by length and left-padded, with
position ids taken from the attention mask, so mixed lengths batch correctly.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import torch

from evomerge.evaluate.chat import chat_ids, end_token_ids, stop_checker
from evomerge.evaluate.vllm_engine import VllmModel


def _cache_kwarg(model: torch.nn.Module) -> str:
    """transformers 5 renamed ``past_key_values`` to ``cache``; accept both."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def keep_last_logits(model: torch.nn.Module, n: int) -> dict[str, int]:
    """Forward kwargs that compute logits for the last ``n`` positions only, where the model supports it.

    A prefill otherwise materialises batch x length x vocab logits: for a 150k vocabulary, 64 prompts
    of 1,000 tokens that is 38 GB, of which generation reads one position per row.
    """
    params = inspect.signature(model.forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):  # the older name before transformers 4.50
        if name in params:
            return {name: n}
    return {}


@torch.inference_mode()
def greedy_generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    stop: Callable[[list[int]], bool] | None = None,
) -> list[list[int]]:
    """Greedy continuations for token-id prompts, in the order given, each cut before its first end token.

    ``eos_token_id`` may be several ids: an instruct model ends its turn with a token (``<|eot_id|>``,
    ``<|im_end|>``) that need not be the tokenizer's EOS. ``stop``, when given, is asked after every step
    about each unfinished row's tokens so far and ends the row when it says so (stop strings); the
    row's tokens are returned whole, so the caller cuts at the stop string itself. A batch ends as soon
    as every row has ended.
    """
    ends = [eos_token_id] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]
    if not ends:
        raise ValueError("greedy_generate needs at least one end token id")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    end_ids = torch.tensor(ends, device=device)
    key = _cache_kwarg(model)
    keep = keep_last_logits(model, 1)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            p = prompts[i]
            ids[row, width - len(p) :] = torch.as_tensor(p)
            mask[row, width - len(p) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **keep)
        cache = out[key] if key in out else out.past_key_values
        done = torch.zeros(len(idx), dtype=torch.bool, device=device)
        generated = []
        next_pos = pos[:, -1:] + 1
        for step in range(max_new_tokens):
            token = out.logits[:, -1].argmax(-1)
            token = torch.where(done, torch.full_like(token, ends[0]), token)
            generated.append(token)
            done |= torch.isin(token, end_ids)
            if stop is not None:
                so_far = torch.stack(generated, dim=1).tolist()
                for row in range(len(idx)):
                    if not done[row] and stop(so_far[row]):
                        done[row] = True
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_pos,
                        use_cache=True, **{key: cache})
            cache = out[key] if key in out else out.past_key_values
            next_pos = next_pos + 1
        gen = torch.stack(generated, dim=1).tolist()
        end_set = set(ends)
        for row, i in enumerate(idx):
            seq = gen[row]
            cut = next((k for k, t in enumerate(seq) if t in end_set), len(seq))
            results[i] = seq[:cut]
    return results


def exact_match(
    model: torch.nn.Module,
    tokenizer,
    items: Sequence[dict],
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> list[float]:
    """1.0 where the greedy continuation of ``item['prompt']`` equals ``item['answer']``."""
    prompts = [tokenizer(it["prompt"])["input_ids"] for it in items]
    answer_lens = [len(tokenizer(it["answer"], add_special_tokens=False)["input_ids"]) for it in items]
    outs = greedy_generate(model, prompts, max(answer_lens) + 1, tokenizer.eos_token_id,
                           tokenizer.pad_token_id, batch_size=batch_size, device=device)
    texts = tokenizer.batch_decode(outs, skip_special_tokens=True)
    return [float(t.strip() == it["answer"].strip()) for t, it in zip(texts, items)]


def accuracy(model: torch.nn.Module, tokenizer, items: Sequence[dict]) -> float:
    """Exact-match accuracy over ``items``, rounded to 4 places as the zoo and fusion reports print it."""
    scores = exact_match(model, tokenizer, items)
    return round(sum(scores) / len(scores), 4)


def generate_texts(model: torch.nn.Module | VllmModel, tokenizer: Any, prompts: Sequence[str],
                   max_new_tokens: Sequence[int],
                   batch_size: int, device: torch.device | str, chat_template: bool = False,
                   system_prompt: str | None = None, stop: Sequence[str] = ()) -> list[str]:
    """Greedy continuations, each cut at its own token budget, decoded without special tokens.

    ``model`` is a transformers model or a resident vLLM engine (the same prompts, end tokens and
    budgets either way). A per-item budget keeps an item's score independent of which other items share its batch. With
    ``chat_template`` each prompt is a user turn of the tokenizer's chat template (see
    :mod:`evomerge.evaluate.chat`) and generation also ends at the end-of-turn token; ``stop`` strings
    end a row early (the caller still cuts the text at them).
    """
    if tokenizer.eos_token_id is None and not chat_template:
        raise ValueError("the tokenizer has no eos_token_id; generation needs one to know where an answer ends")
    ends = end_token_ids(tokenizer, model, chat=chat_template)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ends[0]
    if chat_template:
        ids = [chat_ids(tokenizer, p, system_prompt) for p in prompts]
    else:
        ids = [tokenizer(p)["input_ids"] for p in prompts]
    if isinstance(model, VllmModel):  # per-item budgets and end tokens in the engine itself
        outs = model.generate(ids, max_new_tokens, ends, stop)
    else:
        outs = greedy_generate(model, ids, max(max_new_tokens, default=1), ends, pad,
                               batch_size=batch_size, device=device, stop=stop_checker(tokenizer, stop))
    return tokenizer.batch_decode([o[:n] for o, n in zip(outs, max_new_tokens)], skip_special_tokens=True)
