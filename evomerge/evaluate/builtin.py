"""The built-in evaluator: benchmark items from a JSONL file (or the zoo), scored on a model in memory.

This is the fast default. A search scores thousands of candidates, so the per-candidate cost must be
the model's forward passes and nothing else: one hand-written batched greedy loop for generation
(left padding, KV cache) and one batched forward pass per group of choices for multiple choice.

Three scorers:
- ``exact_match``: the greedy continuation, stripped, equals the answer, stripped.
- ``regex``: the first group of ``answer_regex`` found in the continuation equals the answer (the
  regex is applied to the answer too when it matches there, so a GSM8K line "... #### 42" works).
- ``multiple_choice``: the choice with the highest log-likelihood after the prompt is the gold one;
  ``length_normalize`` divides by the choice's length in characters, as lm-eval's ``acc_norm`` does.

Item sources: a list of dicts, a JSONL path, or a zoo reference ``zoo:<skill>/<split>``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch

from evomerge.evaluate.base import EvalContext, ItemResponses
from evomerge.evaluate.chat import render_chat
from evomerge.evaluate.generation import generate_texts, keep_last_logits
from evomerge.evaluate.vllm_engine import VllmModel
from evomerge.refs import resolve_items_ref

Scorer = Literal["exact_match", "regex", "multiple_choice"]
SCORERS: tuple[str, ...] = ("exact_match", "regex", "multiple_choice")


@dataclass(frozen=True)
class Item:
    """One benchmark item, normalised: a generation item has ``answer``, a choice item ``choices``/``gold``."""

    id: str
    prompt: str
    answer: str | None = None
    choices: tuple[str, ...] | None = None
    gold: int | None = None


# ----------------------------------------------------------------------------------------- items


def read_items_file(path: str | Path) -> list[dict]:
    """Rows of a JSONL file; a line that is not a JSON object is named by its number."""
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg}); each line must be one JSON object") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: a JSON {type(row).__name__}, expected an object")
            rows.append(row)
    return rows


def normalise_items(rows: Sequence[dict], benchmark: str, multiple_choice: bool, id_key: str = "id",
                    prompt_key: str = "prompt", answer_key: str = "answer",
                    choices_key: str = "choices") -> list[Item]:
    """Check every row once, where the items enter, and turn it into an :class:`Item`.

    A row without ``id_key`` gets ``<benchmark>-<row index>``: stable for a fixed file, which is
    what the run store and IRT need; give explicit ids when the file may be edited.
    """
    if not rows:
        raise ValueError(f"benchmark '{benchmark}' has no items")
    items, seen = [], set()
    for i, row in enumerate(rows):
        where = f"benchmark '{benchmark}', item {i}"
        item_id = str(row[id_key]) if id_key in row else f"{benchmark}-{i:05d}"
        if item_id in seen:
            raise ValueError(f"{where}: duplicate item id '{item_id}'; item ids must be unique")
        seen.add(item_id)
        prompt = row.get(prompt_key)
        if not isinstance(prompt, str):
            raise ValueError(f"{where} ('{item_id}'): no string '{prompt_key}' (keys: {sorted(row)}); "
                             f"set prompt_key to the field that holds the prompt")
        if multiple_choice:
            choices = row.get(choices_key)
            if (not isinstance(choices, (list, tuple)) or len(choices) < 2
                    or not all(isinstance(c, str) for c in choices)):
                raise ValueError(f"{where} ('{item_id}'): '{choices_key}' must be a list of at least two strings, "
                                 f"got {choices!r}")
            gold = row.get(answer_key)
            if isinstance(gold, str) and gold in choices:
                gold = list(choices).index(gold)
            if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
                raise ValueError(f"{where} ('{item_id}'): '{answer_key}' must be the index of the right choice "
                                 f"(0..{len(choices) - 1}) or its text, got {gold!r}")
            items.append(Item(item_id, prompt, choices=tuple(choices), gold=gold))
        else:
            answer = row.get(answer_key)
            if isinstance(answer, (int, float)) and not isinstance(answer, bool):
                answer = str(answer)
            if not isinstance(answer, str):
                raise ValueError(f"{where} ('{item_id}'): no string '{answer_key}' (keys: {sorted(row)}); "
                                 f"set answer_key to the field that holds the answer")
            items.append(Item(item_id, prompt, answer=answer))
    return items


def select_ids(all_ids: Sequence[str], wanted: Sequence[str] | None, benchmark: str) -> list[str]:
    """``wanted`` checked against the benchmark (every id when None), in the order asked for."""
    if wanted is None:
        return list(all_ids)
    wanted = [str(w) for w in wanted]
    known = set(all_ids)
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise KeyError(f"benchmark '{benchmark}' has no items {unknown[:5]}{' ...' if len(unknown) > 5 else ''} "
                       f"({len(unknown)} unknown of {len(wanted)} asked; ids look like '{all_ids[0]}')")
    if len(set(wanted)) != len(wanted):
        dup = sorted({w for w in wanted if wanted.count(w) > 1})[:5]
        raise ValueError(f"benchmark '{benchmark}': item ids asked for twice: {dup}")
    return wanted


def check_device(model: torch.nn.Module, device: torch.device | str) -> torch.device:
    """The model's device, after checking it is the one the context names (the worker's device).

    Evaluators do not move models: a silent copy of a 7B model between devices per candidate is the
    kind of cost a search must not hide.
    """
    want = torch.device(device)
    have = next(model.parameters()).device
    if have.type != want.type or (want.index is not None and have.index is not None and have.index != want.index):
        raise ValueError(f"the model is on {have} but the evaluation context names {want}; "
                         f"move the model (model.to('{want}')) or set EvalContext(device='{have}')")
    return have


# ------------------------------------------------------------------------------------- generation


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text before the first stop string (lm-eval's ``until``)."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


def regex_extract(pattern: re.Pattern, text: str) -> str | None:
    """The first group of the first match (the whole match when the regex has no group)."""
    m = pattern.search(text)
    if m is None:
        return None
    return (m.group(1) if pattern.groups else m.group(0)).strip()


# -------------------------------------------------------------------------------- multiple choice


def encode_pair(tokenizer: Any, context: str, continuation: str,
                add_special_tokens: bool = True) -> tuple[list[int], list[int]]:
    """Token ids of a context and its continuation, split as lm-eval splits them.

    The pair is tokenised as one string and cut after the context's own tokens, and trailing spaces
    of the context move to the continuation, so BPE merges across the boundary match lm-eval's.
    A context rendered by a chat template holds its special tokens already (``add_special_tokens``
    false), and the newline after its assistant header stays where the template put it.
    """
    spaces = len(context) - len(context.rstrip())
    if spaces and add_special_tokens:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=add_special_tokens)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=add_special_tokens)["input_ids"]
    cont = whole[len(ctx):]
    if not cont:
        raise ValueError(f"the choice {continuation!r} tokenises to nothing after the prompt {context[-40:]!r}")
    return ctx, cont


@torch.inference_mode()
def choice_loglikelihoods(model: torch.nn.Module | VllmModel, tokenizer: Any,
                          items: Sequence[tuple[str, Sequence[str]]],
                          batch_size: int, device: torch.device | str,
                          add_special_tokens: bool = True) -> list[np.ndarray]:
    """Summed log-probability of each choice after its prompt: one array per (prompt, choices) pair.

    Every (prompt, choice) sequence is one row; rows are sorted by length and left-padded (position
    ids from the mask), so every continuation ends the row and the model need only compute logits
    for the last few positions instead of batch x length x vocabulary.
    """
    rows = []  # (item index, choice index, context ids, continuation ids)
    for i, (prompt, choices) in enumerate(items):
        for j, choice in enumerate(choices):
            rows.append((i, j, *encode_pair(tokenizer, prompt, choice, add_special_tokens)))
    if isinstance(model, VllmModel):  # prompt log-probabilities of the same token ids
        sums = model.loglikelihoods([(ctx, cont) for _, _, ctx, cont in rows])
        lls = [np.zeros(len(choices)) for _, choices in items]
        for (i, j, _, _), (total, _) in zip(rows, sums):
            lls[i][j] = total
        return lls
    rows.sort(key=lambda r: -(len(r[2]) + len(r[3])))
    out = [np.zeros(len(choices)) for _, choices in items]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        seqs = [(ctx + cont)[:-1] for _, _, ctx, cont in batch]  # the last token is predicted, not read
        width = max(len(s) for s in seqs)
        keep = max(len(cont) for *_, cont in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, width - len(s):] = torch.as_tensor(s)
            mask[r, width - len(s):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                       **keep_last_logits(model, keep)).logits[:, -keep:]
        for r, (i, j, _, cont) in enumerate(batch):
            logp = torch.log_softmax(logits[r, keep - len(cont):].float(), dim=-1)
            target = torch.as_tensor(cont, device=logp.device)
            out[i][j] = float(logp.gather(-1, target[:, None]).sum())
    return out


def pick_choice(loglikelihoods: np.ndarray, choices: Sequence[str], length_normalize: bool) -> int:
    """Index of the preferred choice; ``length_normalize`` is lm-eval's acc_norm (per character)."""
    scores = loglikelihoods / np.array([len(c) for c in choices], dtype=float) if length_normalize else loglikelihoods
    return int(np.argmax(scores))


# ---------------------------------------------------------------------------------------- evaluator


class ItemsBenchmark:
    """A benchmark of items scored on a transformers causal LM held in memory (the Evaluator protocol).

    ``items`` is a list of dicts, a JSONL path or ``zoo:<skill>/<split>``. ``max_new_tokens`` for
    exact match defaults to each answer's token count + 1 (enough to see the answer and the EOS after
    it); the regex scorer needs it set, since where the answer appears in a generation is unknown.
    ``chat_template`` asks each prompt as a user turn of the tokenizer's chat template (after
    ``system_prompt`` when given) and ends answers at the end-of-turn token too.
    """

    def __init__(self, name: str, items: str | Path | Sequence[dict], scorer: Scorer = "exact_match",
                 answer_regex: str | None = None, max_new_tokens: int | None = None, batch_size: int = 64,
                 prompt_key: str = "prompt", answer_key: str = "answer", choices_key: str = "choices",
                 id_key: str = "id", length_normalize: bool = False, stop: Sequence[str] = (),
                 chat_template: bool = False, system_prompt: str | None = None):
        if scorer not in SCORERS:
            raise ValueError(f"benchmark '{name}': scorer '{scorer}' is not one of {list(SCORERS)}")
        if scorer == "regex":
            if not answer_regex:
                raise ValueError(f"benchmark '{name}': the regex scorer needs answer_regex, e.g. '#### (\\S+)'")
            if max_new_tokens is None:
                raise ValueError(f"benchmark '{name}': the regex scorer needs max_new_tokens (how far to generate "
                                 f"before looking for the answer), e.g. 256 for GSM8K-style reasoning")
        elif answer_regex is not None:
            raise ValueError(f"benchmark '{name}': answer_regex is used only by scorer='regex', not '{scorer}'")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"benchmark '{name}': max_new_tokens must be >= 1, got {max_new_tokens}")
        if batch_size < 1:
            raise ValueError(f"benchmark '{name}': batch_size must be >= 1, got {batch_size}")
        if system_prompt is not None and not chat_template:
            raise ValueError(f"benchmark '{name}': system_prompt is used only with chat_template: true")
        try:
            self.pattern = re.compile(answer_regex) if answer_regex else None
        except re.error as e:
            raise ValueError(f"benchmark '{name}': answer_regex {answer_regex!r} does not compile ({e})") from None
        rows = read_items_file(resolve_items_ref(items)) if isinstance(items, (str, Path)) else list(items)
        self.name = name
        self.scorer = scorer
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.length_normalize = length_normalize
        self.stop = tuple(stop)
        self.chat_template = chat_template
        self.system_prompt = system_prompt
        self.items = normalise_items(rows, name, scorer == "multiple_choice", id_key, prompt_key, answer_key,
                                     choices_key)
        self._by_id = {it.id: it for it in self.items}

    def item_ids(self) -> list[str]:
        return [it.id for it in self.items]

    def evaluate(self, model: torch.nn.Module | VllmModel, tokenizer: Any, ctx: EvalContext) -> ItemResponses:
        device = model.device if isinstance(model, VllmModel) else check_device(model, ctx.device)
        ids = select_ids(self.item_ids(), ctx.item_ids, self.name)
        items = [self._by_id[i] for i in ids]
        if not items:
            return ItemResponses(self.name, [], np.zeros(0))
        if self.scorer == "multiple_choice":
            scores = self._score_choices(model, tokenizer, items, device)
        else:
            scores = self._score_generations(model, tokenizer, items, device)
        return ItemResponses(self.name, ids, np.asarray(scores, dtype=np.float64))

    def _score_generations(self, model, tokenizer, items: list[Item], device) -> list[float]:
        if self.max_new_tokens is not None:
            budgets = [self.max_new_tokens] * len(items)
        else:
            budgets = [len(tokenizer(it.answer, add_special_tokens=False)["input_ids"]) + 1 for it in items]
        texts = generate_texts(model, tokenizer, [it.prompt for it in items], budgets, self.batch_size, device,
                               chat_template=self.chat_template, system_prompt=self.system_prompt, stop=self.stop)
        texts = [cut_at_stop(t, self.stop) for t in texts]
        answers = [it.answer or "" for it in items]  # generation items always have one (normalise_items)
        if self.scorer == "exact_match":
            return [float(t.strip() == a.strip()) for t, a in zip(texts, answers)]
        assert self.pattern is not None, "the regex scorer always has a pattern"
        scores = []
        for text, answer in zip(texts, answers):
            predicted = regex_extract(self.pattern, text)
            target = regex_extract(self.pattern, answer) or answer.strip()
            scores.append(float(predicted is not None and predicted == target))
        return scores

    def _score_choices(self, model, tokenizer, items: list[Item], device) -> list[float]:
        prompts = [render_chat(tokenizer, it.prompt, self.system_prompt) if self.chat_template else it.prompt
                   for it in items]
        lls = choice_loglikelihoods(model, tokenizer, [(p, it.choices or ()) for p, it in zip(prompts, items)],
                                    self.batch_size, device, add_special_tokens=not self.chat_template)
        return [float(pick_choice(ll, it.choices or (), self.length_normalize) == it.gold)
                for ll, it in zip(lls, items)]
