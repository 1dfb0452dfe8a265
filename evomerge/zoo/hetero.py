"""A heterogeneous expert for the zoo: another architecture, another tokenizer, a skill the zoo lacks.

The zoo's models are all one tiny Llama with one character tokenizer, so they can be merged weight by
weight. Distribution-based fusion (FuseLLM) exists for the case where that is impossible: sources
of different architectures and vocabularies. This module builds such a source from a seed, beside
the zoo and cached by its own spec hash:

- a byte-level BPE tokenizer trained here with ``tokenizers`` on the zoo's text. Its merges are the
  frequent digit pairs, doubled digits first (``33``), so one of its tokens often spans two of the
  zoo's characters: token alignment has real many-to-one work to do;
- a tiny ``GPT2LMHeadModel`` (absolute positions, LayerNorm, GELU, tied head: nothing like Llama)
  trained from scratch on a new skill, ``dup`` (``D:3829=`` -> ``33882299``), which the zoo's models
  have never seen, plus the zoo's copy tasks so that its next-token distributions on the shared
  prompt shape are sensible rather than noise.

Both load with plain ``AutoModelForCausalLM`` / ``AutoTokenizer``. Item files for ``dup`` (train /
fitness / test, the zoo's item format) live in the same cache folder; ``accuracy.json`` records the
expert on its skills and the zoo's models on ``dup`` (near 0: the skill is new to them).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from evomerge.evaluate.generation import accuracy
from evomerge.zoo.build import Zoo, build_atomically, save_model, train_with_progress, training_progress
from evomerge.zoo.skills import SKILLS, Skill, make_items, random_string, read_jsonl, write_jsonl

HETERO_VERSION = 1  # bump when the build code changes what it produces for the same spec
BOS, EOS, PAD = "<|bos|>", "<|endoftext|>", "<|pad|>"


def duplicate(s: str) -> str:
    """``3829`` -> ``33882299``: every character written twice."""
    return "".join(c + c for c in s)


# The new skill. Its marker letter is not one the zoo uses (C L R S T X), so a zoo model has no cue.
HETERO_SKILLS: dict[str, Skill] = {"dup": Skill("dup", "D", duplicate)}


@dataclass(frozen=True)
class HeteroSpec:
    """Everything that determines the heterogeneous expert; its hash (with the zoo's) names the folder."""

    seed: int = 0
    skill: str = "dup"
    # 256 byte symbols + 3 specials + 10 merges, which on this corpus are exactly the doubled digits
    # ``00``..``99``. Measured: with 61 merges (all frequent digit pairs, ``3829`` -> ``38`` ``29``) the
    # same model reached .67 on dup in 800 steps, .87 in 1,500; with the 10 it reaches .92 in 1,000.
    bpe_vocab_size: int = 269
    n_embd: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_positions: int = 64
    steps: int = 1200
    lr: float = 2e-3
    batch_size: int = 64
    lengths: tuple[int, int] = (3, 8)  # training strings; item files use the zoo's item lengths
    # skill -> (weight, min length, max length): the new skill plus the zoo's copy tasks.
    mixture: dict[str, tuple[float, int, int]] = field(default_factory=lambda: {
        "dup": (0.5, 3, 8), "copy": (0.3, 3, 8), "copyl": (0.2, 3, 8)})

    def digest(self, zoo: Zoo) -> str:
        blob = json.dumps({"version": HETERO_VERSION, "zoo": zoo.spec.digest(), **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def hetero_root(zoo: Zoo, spec: HeteroSpec | None = None, root: str | Path | None = None) -> Path:
    """The cache folder of the expert: beside the zoo unless ``root`` says otherwise."""
    spec = spec or HeteroSpec()
    base = Path(root) if root is not None else zoo.root.parent
    return base / f"hetero-{spec.digest(zoo)}"


def hetero_items_path(expert: str | Path, skill: str, split: str) -> Path:
    """Item file of a heterogeneous skill, given the expert's folder (as ``ensure_hetero_expert`` returns)."""
    return Path(expert).parent / "items" / skill / f"{split}.jsonl"


def ensure_hetero_expert(zoo: Zoo, root: str | Path | None = None, spec: HeteroSpec | None = None,
                         console: Console | None = None, force: bool = False) -> Path:
    """Folder of the GPT-2 / BPE expert for ``zoo``, building it (about a minute) unless cached.

    Built in a temporary folder renamed into place at the end, like the zoo, so an interrupted build
    is never mistaken for a finished one.
    """
    spec = spec or HeteroSpec()
    if spec.skill not in HETERO_SKILLS:
        raise ValueError(f"HeteroSpec.skill '{spec.skill}' is unknown; choose one of {sorted(HETERO_SKILLS)}")
    unknown = [s for s in spec.mixture if s not in SKILLS and s not in HETERO_SKILLS]
    if unknown:
        raise ValueError(f"HeteroSpec.mixture names unknown skills {unknown}; "
                         f"known: {sorted(SKILLS) + sorted(HETERO_SKILLS)}")
    final = hetero_root(zoo, spec, root)
    if (final / "accuracy.json").exists() and not force:
        return final / spec.skill
    console = console or Console(stderr=True)
    build_atomically(final, lambda tmp: _build(zoo, spec, tmp, console), console, "heterogeneous expert")
    return final / spec.skill


def _skill(name: str) -> Skill:
    return HETERO_SKILLS.get(name) or SKILLS[name]


def bpe_corpus(zoo: Zoo, spec: HeteroSpec, n: int = 4000) -> list[str]:
    """Text the tokenizer learns its merges from: the zoo's train items and the expert's own mixture."""
    texts = [it["prompt"] + it["answer"] for s in zoo.skills for it in zoo.items(s, "train")]
    rng = random.Random(f"{spec.seed}-bpe")
    texts += ["".join(p) for p in _sampler(spec, {})(rng, n)]
    return texts


def train_bpe(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2's scheme) with its own specials; BOS prepended as the zoo's tokenizer does.

    Digits are pre-split as a run (GPT-2's regex), so merges form inside numbers: ``33``, ``3829`` ->
    ``38`` ``29`` and so on, which is what makes this vocabulary disagree with the zoo's characters.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   padding_side="left", clean_up_tokenization_spaces=False)


def _sampler(spec: HeteroSpec, held_out: dict[str, set[str]]):
    names = list(spec.mixture)
    weights = [spec.mixture[n][0] for n in names]

    def sample(rng: random.Random, n: int) -> list[tuple[str, str]]:
        out = []
        for _ in range(n):
            name = rng.choices(names, weights)[0]
            _, lo, hi = spec.mixture[name]
            skill = _skill(name)
            while True:  # never train on a fitness or test item
                prompt, answer = skill.item(random_string(rng, skill.alphabet, lo, hi))
                if prompt not in held_out.get(name, ()):
                    break
            out.append((prompt, answer))
        return out

    return sample


def _build(zoo: Zoo, spec: HeteroSpec, out: Path, console: Console) -> None:
    skill = HETERO_SKILLS[spec.skill]
    splits = make_items(skill, dict(zoo.spec.splits), zoo.spec.item_lengths, spec.seed)
    for split, rows in splits.items():
        write_jsonl(out / "items" / skill.name / f"{split}.jsonl", rows)
    held_out = {skill.name: {r["prompt"] for s in ("fitness", "test") for r in splits[s]}}

    tok = train_bpe(bpe_corpus(zoo, spec), spec.bpe_vocab_size)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=spec.n_embd, n_layer=spec.n_layer, n_head=spec.n_head,
                     n_positions=spec.n_positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(spec.seed)
    model = GPT2LMHeadModel(cfg)
    with training_progress(console) as progress:
        train_with_progress(progress, f"gpt2 {skill.name}", model, tok, _sampler(spec, held_out), spec.steps,
                            spec.lr, spec.batch_size, spec.seed)
    save_model(model, tok, out / skill.name)
    tok.backend_tokenizer.model.save(str(out / skill.name))  # vocab.json + merges.txt, for GPT-2 tooling

    # Measure with the saved files, loaded as a user would: the expert on its skills, the zoo on the new one.
    loaded: Any = AutoModelForCausalLM.from_pretrained(out / skill.name)
    tok = AutoTokenizer.from_pretrained(out / skill.name)  # type: ignore[assignment]  # the same fast tokenizer class
    model = loaded
    test = read_jsonl(out / "items" / skill.name / "test.jsonl")
    rng = random.Random(f"{spec.seed}-copy-probe")
    copy_items = [{"prompt": p, "answer": a} for p, a in
                  (_skill(n).item(random_string(rng, _skill(n).alphabet, 3, 6)) for n in ("copy", "copyl")
                   for _ in range(150))]
    acc = {"hetero_expert": {skill.name: accuracy(model, tok, test), "copy": accuracy(model, tok, copy_items)}}
    for name, path in {"base": zoo.base, **zoo.experts}.items():
        zm, zt = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
        acc[f"zoo_{name}"] = {skill.name: accuracy(zm, zt, test)}
    report = {"split": "test", "accuracy": acc, "spec": asdict(spec), "zoo": zoo.spec.digest(),
              "tokenizer": {"vocab_size": len(tok), "example": tok.tokenize(test[0]["prompt"] + test[0]["answer"])}}
    (out / "spec.json").write_text(json.dumps(asdict(spec), indent=1))
    (out / "accuracy.json").write_text(json.dumps(report, indent=1))
    for name, row in acc.items():
        console.print(f"  {name:<14} " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()))
