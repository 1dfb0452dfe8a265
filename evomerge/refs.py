"""References to models and item files, as experiment files write them, resolved in one place.

Models: ``zoo:<name>`` (the tiny zoo's base and experts, built on first use), ``zoo:smol/<name>``
(the SmolLM2 zoo: ``base``, ``add``, ``upper``), ``hetero:<skill>`` (the
heterogeneous GPT-2 expert), a folder (relative to the experiment file's folder, or as given), or a
hub id (fetched by ``evomerge.checkpoint.resolve_model_path``). Item files: ``zoo:<skill>/<split>``,
``zoo:smol/<skill>/<split>``, ``hetero:<skill>/<split>`` or a JSONL path.

``check_*`` say whether a reference can resolve without building or loading anything (config time);
``resolve_*`` give the folder or file, building the zoo if it is needed.
"""

from __future__ import annotations

from pathlib import Path

from evomerge.checkpoint import resolve_model_path

ITEM_SCHEMES = {"zoo:": "rev/fitness", "hetero:": "dup/train"}  # scheme -> an example <skill>/<split>
SMOL = "zoo:smol/"  # the SmolLM2 zoo (evomerge.zoo.smol), before the tiny zoo's zoo:


def check_model_ref(field: str, ref: str, root: Path, allow_hub: bool = True) -> None:
    """Raise, naming ``field``, when a model reference cannot resolve (nothing is built or fetched)."""
    if ref.startswith(SMOL):
        from evomerge.zoo.smol import SmolSpec

        have = ["base", *SmolSpec().experts]
        if ref[len(SMOL):] not in have:
            raise ValueError(f"{field}: the smol zoo has no model '{ref[len(SMOL):]}'; choose one of "
                             f"{[SMOL + m for m in have]}")
    elif ref.startswith("zoo:"):
        from evomerge.zoo import ZooSpec

        have = ["base", *ZooSpec().experts]
        if ref[4:] not in have:
            raise ValueError(f"{field}: the zoo has no model '{ref[4:]}'; choose one of {['zoo:' + h for h in have]}")
    elif ref.startswith("hetero:"):
        from evomerge.zoo.hetero import HETERO_SKILLS

        if ref[7:] not in HETERO_SKILLS:
            raise ValueError(f"{field}: no heterogeneous expert '{ref[7:]}'; choose one of "
                             f"{['hetero:' + h for h in HETERO_SKILLS]}")
    elif not (root / ref).expanduser().is_dir() and not Path(ref).expanduser().is_dir():
        looks_local = ref.startswith((".", "/", "~")) or ref.count("/") != 1
        if looks_local or not allow_hub:
            forms = "a folder, 'zoo:<name>' or a hub id (org/name)" if allow_hub else \
                "a folder, 'zoo:<name>' or 'hetero:<skill>'"
            raise ValueError(f"{field}: '{ref}' is not a model folder (looked for {(root / ref).expanduser()}); "
                             f"give {forms}")


def resolve_model_ref(ref: str, root: Path) -> Path:
    """The folder of a model reference (the zoos and the heterogeneous expert are built on first use)."""
    if ref.startswith(SMOL):
        from evomerge.zoo.smol import resolve_smol_model

        return resolve_smol_model(ref)
    if ref.startswith("zoo:"):
        from evomerge.zoo import ensure_zoo

        zoo = ensure_zoo()
        member = ref[4:]
        path = zoo.base if member == "base" else zoo.root / member
        if not path.is_dir():
            raise ValueError(f"'{ref}': the zoo has no model '{member}'; it has base, {', '.join(zoo.skills)}")
        return path
    if ref.startswith("hetero:"):
        from evomerge.zoo import ensure_zoo
        from evomerge.zoo.hetero import HeteroSpec, ensure_hetero_expert

        return ensure_hetero_expert(ensure_zoo(), spec=HeteroSpec(skill=ref[7:]))
    if (root / ref).expanduser().is_dir():
        return (root / ref).expanduser().resolve()
    return resolve_model_path(ref)


def split_items_ref(ref: str) -> tuple[str, str, str] | None:
    """``(scheme, skill, split)`` of a ``zoo:`` / ``hetero:`` item reference, None for a path;
    a malformed reference raises with the form it must take (``zoo:smol/...`` is the smol zoo's)."""
    if ref.startswith(SMOL):
        skill, _, split = ref[len(SMOL):].partition("/")
        if not skill or not split or "/" in split:
            raise ValueError(f"'{ref}' must look like '{SMOL}<skill>/<split>', e.g. '{SMOL}add/fitness'")
        return SMOL, skill, split
    for scheme, example in ITEM_SCHEMES.items():
        if ref.startswith(scheme):
            skill, _, split = ref[len(scheme):].partition("/")
            if not skill or not split or "/" in split:
                raise ValueError(f"'{ref}' must look like '{scheme}<skill>/<split>', e.g. '{scheme}{example}'")
            return scheme, skill, split
    return None


def check_items_ref(field: str, ref: str, root: Path) -> None:
    """Raise, naming ``field``, when an item reference is malformed or its file is missing."""
    try:
        if split_items_ref(ref) is not None:
            return
    except ValueError as err:
        raise ValueError(f"{field}: {err}") from None
    if not (root / ref).expanduser().is_file() and not Path(ref).expanduser().is_file():
        raise ValueError(f"{field}: item file '{ref}' does not exist (looked beside the experiment file and in "
                         "the working directory); give a JSONL path, 'zoo:<skill>/<split>' or 'hetero:<skill>/<split>'")


def resolve_items_ref(ref: str | Path, root: Path | None = None) -> Path:
    """A JSONL path (relative to ``root`` when it is there), ``zoo:<skill>/<split>`` resolved in the
    zoo's cache (built on first use), or ``hetero:<skill>/<split>`` for the heterogeneous expert's skill."""
    text = str(ref)
    parts = split_items_ref(text)
    if parts is None:
        if root is not None and (root / text).expanduser().is_file():
            return (root / text).expanduser()
        path = Path(text).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"item file '{text}' does not exist; give a JSONL path or 'zoo:<skill>/<split>'")
        return path
    scheme, skill, split = parts
    if scheme == SMOL:
        from evomerge.zoo.smol import resolve_smol_items

        return resolve_smol_items(text)
    from evomerge.zoo import ensure_zoo
    from evomerge.zoo.build import LARGE_SPLITS, ensure_large_split

    zoo = ensure_zoo()
    if scheme == "hetero:":
        from evomerge.zoo.hetero import HETERO_SKILLS, HeteroSpec, ensure_hetero_expert, hetero_items_path

        if skill not in HETERO_SKILLS:
            raise ValueError(f"reference '{text}': no heterogeneous skill '{skill}'; "
                             f"choose one of {sorted(HETERO_SKILLS)}")
        path = hetero_items_path(ensure_hetero_expert(zoo, spec=HeteroSpec(skill=skill)), skill, split)
        if not path.exists():
            have = sorted(p.stem for p in path.parent.glob("*.jsonl"))
            raise ValueError(f"reference '{text}': no split '{split}'; choose one of {have}")
        return path
    if split in LARGE_SPLITS and zoo.items_path(skill, "fitness").exists():
        return ensure_large_split(zoo, skill, split)
    path = zoo.items_path(skill, split)
    if not path.exists():
        have = sorted(f"zoo:{p.parent.name}/{p.stem}" for p in (zoo.root / "items").glob("*/*.jsonl"))
        raise ValueError(f"zoo reference '{text}': the zoo has no such item file; choose one of {have}")
    return path
