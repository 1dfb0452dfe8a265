"""The tiny model zoo: a character tokenizer, synthetic skills with item files, a tiny Llama base
and experts fine-tuned from it. Built locally from a seed, cached by a hash of its spec."""

from evomerge.zoo.build import Zoo, ZooSpec, ensure_zoo

__all__ = ["Zoo", "ZooSpec", "ensure_zoo"]
