"""Build (or find in the cache) the tiny model zoo.

The zoo is what the demo, the tests and the benchmarks merge: real Hugging Face checkpoints, built
here from nothing. Its design follows what made merging interesting on a tiny model: a base that
already knows a little of every skill (each skill only on short strings, the cipher only on part of
its alphabet) and experts fine-tuned briefly from it, each on one skill over all lengths. Experts
therefore share a basin with the base and with each other, their task vectors add up to something
meaningful, and skills that share a prompt shape interfere, so a uniform merge loses what a
searched merge can keep.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from evomerge.evaluate.generation import accuracy
from evomerge.zoo.skills import SKILLS, make_items, more_items, random_string, read_jsonl, write_jsonl
from evomerge.zoo.tokenizer import char_tokenizer
from evomerge.zoo.train import train

ZOO_VERSION = 2  # bump when the build code changes what it produces for the same spec

# skill -> (weight, min length, max length, alphabet or None for the skill's own[, length decay]):
# with a decay d < 1 a string of length n is drawn with probability proportional to d ** (n - min),
# so the base learns short strings well and long ones a little: a graded difficulty ladder.
Mixture = dict[str, tuple]


@dataclass(frozen=True)
class ZooSpec:
    """Everything that determines the zoo; its hash names the cache folder."""

    seed: int = 0
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    lengths: tuple[int, int] = (3, 8)  # experts train on every length
    # Item files span lengths 3..6: over a population of merges, longer strings are floor items
    # (solved by almost no merge: 50% of rev items at 3..8 vs 27% at 3..6), which tell a fitness
    # estimator nothing. Measured: items with pass rates in [0.2, 0.8] rev .32 -> .49, sort .46 -> .64.
    item_lengths: tuple[int, int] = (3, 6)
    batch_size: int = 64
    base_steps: int = 600
    base_lr: float = 2e-3
    base_mixture: Mixture = field(default_factory=lambda: {
        "copy": (0.4, 3, 8, None),
        "copyl": (0.2, 3, 8, None),
        "rev": (0.1, 3, 4, None),
        "sort": (0.1, 3, 4, None),
        "tr": (0.1, 3, 8, "0123456"),
        "revtr": (0.1, 3, 4, "0123456"),
    })
    experts: tuple[str, ...] = ("rev", "sort", "tr")
    expert_steps: int = 300
    expert_lr: float = 5e-4
    expert_share: float = 0.5  # the rest of an expert's batch replays copying, to stay near the base
    cross_target: str = "revtr"
    splits: tuple[tuple[str, int], ...] = (("train", 2000), ("fitness", 600), ("test", 600))

    def digest(self) -> str:
        blob = json.dumps({"version": ZOO_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


class ZooFiles:
    """What every built zoo folder holds (the tiny zoo's and the smol zoo's): an expert folder per
    skill, item files per skill and split, and the accuracy table its build measured."""

    root: Path
    spec: Any  # a spec with ``experts``

    @property
    def experts(self) -> dict[str, Path]:
        return {name: self.root / name for name in self.spec.experts}

    @property
    def skills(self) -> list[str]:
        return list(self.spec.experts)

    def items_path(self, skill: str, split: str) -> Path:
        return self.root / "items" / skill / f"{split}.jsonl"

    def items(self, skill: str, split: str) -> list[dict]:
        return read_jsonl(self.items_path(skill, split))

    def accuracy(self) -> dict:
        return json.loads((self.root / "accuracy.json").read_text())


@dataclass(frozen=True)
class Zoo(ZooFiles):
    """Paths of a built zoo."""

    root: Path
    spec: ZooSpec

    @property
    def base(self) -> Path:
        return self.root / "base"


#: extra item splits made on first use, disjoint from the zoo's own: name -> items per skill
LARGE_SPLITS = {"fitness_large": 5000}


def ensure_large_split(zoo: Zoo, skill: str, split: str) -> Path:
    """The item file of a large split (``LARGE_SPLITS``) of ``skill``, drawn from the zoo's seed on first
    use with no prompt of the zoo's train, fitness or test split, written atomically."""
    path = zoo.items_path(skill, split)
    if not path.exists():
        own = {r["prompt"] for s, _ in zoo.spec.splits for r in zoo.items(skill, s)}
        rows = more_items(SKILLS[skill], split, LARGE_SPLITS[split], zoo.spec.item_lengths, zoo.spec.seed, own)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        write_jsonl(tmp, rows)
        os.replace(tmp, path)
    return path


def default_root() -> Path:
    """``$EVOMERGE_HOME/zoo`` (default ``~/.cache/evomerge/zoo``), like ``HF_HOME`` for hub files."""
    home = os.environ.get("EVOMERGE_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "evomerge")
    return Path(home) / "zoo"


def ensure_zoo(spec: ZooSpec | None = None, root: str | Path | None = None,
               console: Console | None = None, force: bool = False) -> Zoo:
    """Return the zoo for ``spec``, building it first unless a complete copy is cached.

    The build writes into a temporary folder and renames it into place at the end, so an
    interrupted build never leaves a half-zoo that a later call would take for a finished one.
    """
    spec = spec or ZooSpec()
    root = Path(root) if root is not None else default_root()
    final = root / f"zoo-{spec.digest()}"
    if (final / "accuracy.json").exists() and not force:
        return Zoo(final, spec)
    console = console or Console(stderr=True)
    build_atomically(final, lambda tmp: _build(spec, tmp, console), console, "zoo")
    return Zoo(final, spec)


def build_atomically(final: Path, build: Callable[[Path], None], console: Console, what: str) -> None:
    """Run ``build`` into a temporary folder beside ``final`` and rename it into place at the end, so
    an interrupted build never leaves a half-built folder that a later call takes for a finished one."""
    tmp = final.parent / f".building-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.time()
    build(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    console.print(f"[green]{what} built in {time.time() - t0:.0f} s[/green] -> {final}")


def training_progress(console: Console) -> Progress:
    """The progress display of the zoo's training runs: one bar per model, with its running loss."""
    return Progress(TextColumn("{task.description:<14}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console)


def _model_config(spec: ZooSpec, tok) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tok), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads, max_position_embeddings=64, rms_norm_eps=1e-6,
        tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def _sampler(mixture: Mixture, held_out: dict[str, set[str]]):
    names = list(mixture)
    weights = [mixture[n][0] for n in names]

    def sample(rng: random.Random, n: int) -> list[tuple[str, str]]:
        out = []
        for _ in range(n):
            name = rng.choices(names, weights)[0]
            _, lo, hi, alphabet, *rest = mixture[name]
            lengths = list(range(lo, hi + 1))
            length_weights = [rest[0] ** (n - lo) for n in lengths] if rest else None
            skill = SKILLS[name]
            while True:  # never train on a fitness or test item
                n = rng.choices(lengths, length_weights)[0] if length_weights else rng.randint(lo, hi)
                prompt, answer = skill.item(random_string(rng, alphabet or skill.alphabet, n, n))
                if prompt not in held_out.get(name, ()):
                    break
            out.append((prompt, answer))
        return out

    return sample


def train_with_progress(progress: Progress, label: str, model, tok, sampler, steps, lr, batch_size, seed,
                        warmup: int = 20):
    task = progress.add_task(label, total=steps, loss=float("nan"))
    train(model, tok, sampler, steps, lr, batch_size, seed, warmup=warmup,
          log=lambda step, loss: progress.update(task, advance=1, loss=loss))


def save_model(model, tok, path: Path) -> None:
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)


def _uniform_task_arithmetic(base, experts: list, lam: float):
    merged = copy.deepcopy(base)
    sd, bsd = merged.state_dict(), base.state_dict()
    with torch.no_grad():
        for name, t in sd.items():
            t.copy_(bsd[name] + lam * sum(e.state_dict()[name] - bsd[name] for e in experts))
    return merged


def _build(spec: ZooSpec, out: Path, console: Console) -> None:
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    tok = char_tokenizer()
    tok.save_pretrained(out / "tokenizer")
    skills = list(spec.experts) + [spec.cross_target]
    held_out: dict[str, set[str]] = {}
    for i, name in enumerate(skills):
        splits = make_items(SKILLS[name], dict(spec.splits), spec.item_lengths, spec.seed)
        for split, rows in splits.items():
            write_jsonl(out / "items" / name / f"{split}.jsonl", rows)
        held_out[name] = {r["prompt"] for s in ("fitness", "test") for r in splits[s]}

    cfg = _model_config(spec, tok)
    torch.manual_seed(spec.seed)
    base = LlamaForCausalLM(cfg)
    experts = {}
    with training_progress(console) as progress:
        train_with_progress(progress, "base", base, tok, _sampler(spec.base_mixture, held_out),
                            spec.base_steps, spec.base_lr, spec.batch_size, spec.seed)
        save_model(base, tok, out / "base")
        full = (1.0, *spec.lengths, None)
        for i, name in enumerate(spec.experts):
            mix: Mixture = {name: (spec.expert_share, *full[1:]),
                            "copy": ((1 - spec.expert_share) * 2 / 3, *full[1:]),
                            "copyl": ((1 - spec.expert_share) / 3, *full[1:])}
            expert = copy.deepcopy(base)
            train_with_progress(progress, f"expert {name}", expert, tok, _sampler(mix, held_out),
                                spec.expert_steps, spec.expert_lr, spec.batch_size, spec.seed + 1 + i)
            save_model(expert, tok, out / name)
            experts[name] = expert

    models = {"base": base, **{f"expert_{k}": v for k, v in experts.items()},
              "uniform_task_arithmetic": _uniform_task_arithmetic(base, list(experts.values()), 1 / len(experts))}
    acc = {m: {s: accuracy(model, tok, read_jsonl(out / "items" / s / "test.jsonl")) for s in skills}
           for m, model in models.items()}
    checks = zoo_checks(acc, list(spec.experts))
    report = {"split": "test", "accuracy": acc, "checks": checks, "spec": asdict(spec)}
    (out / "spec.json").write_text(json.dumps(asdict(spec), indent=1))
    (out / "accuracy.json").write_text(json.dumps(report, indent=1))
    print_accuracy(acc, checks, skills, console)


def zoo_checks(acc: dict[str, dict[str, float]], experts: list[str],
               min_own: float | None = 0.85) -> dict[str, bool]:
    """The properties the zoo promises (measured on the test split); ``min_own`` None drops the
    absolute floor on an expert's own skill (brief fine-tunes of a real model promise only the gain)."""
    checks = {}
    for e in experts:
        own = acc[f"expert_{e}"][e]
        if min_own is not None:
            checks[f"expert {e}: own skill >= {min_own}"] = own >= min_own
        checks[f"expert {e}: >= base + 0.25"] = own >= acc["base"][e] + 0.25
        others = [s for s in experts if s != e]
        checks[f"expert {e}: a specialist"] = any(
            acc[f"expert_{e}"][s] + 0.2 <= max(acc[f"expert_{o}"][s] for o in experts if o != e)
            for s in others)
    best = {s: max(acc[f"expert_{e}"][s] for e in experts) for s in experts}
    checks["uniform merge below the best expert on some skill (by 0.2)"] = any(
        acc["uniform_task_arithmetic"][s] + 0.2 <= best[s] for s in experts)
    return checks


def print_accuracy(acc, checks, skills, console: Console) -> None:
    table = Table(title="zoo: exact-match accuracy on the test split")
    table.add_column("model")
    for s in skills:
        table.add_column(s, justify="right")
    table.add_column("mean (experts' skills)", justify="right")
    experts = skills[:-1]
    for m, row in acc.items():
        mean = sum(row[s] for s in experts) / len(experts)
        table.add_row(m, *[f"{row[s]:.3f}" for s in skills], f"{mean:.3f}")
    console.print(table)
    for name, ok in checks.items():
        console.print(f"  {'[green]ok[/green]  ' if ok else '[red]FAIL[/red]'} {name}")


def load(path: str | Path):
    """Load a zoo checkpoint exactly as a user would."""
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
