"""A character-level tokenizer saved as a standard ``tokenizer.json``.

One token per printable ASCII character plus four specials. Built with the ``tokenizers`` library as
a BPE model with no merges (so every character is its own token) and a ``Fuse`` decoder (so decoding
joins characters without spaces), then wrapped in ``PreTrainedTokenizerFast`` so that
``AutoTokenizer.from_pretrained`` and lm-eval load it unchanged.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models, processors
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = [c for c in string.printable if c not in "\t\n\r\x0b\x0c"]  # 95 printable characters


def char_tokenizer() -> PreTrainedTokenizerFast:
    """Return the zoo's character tokenizer (vocab 99: 4 specials + 95 printable characters)."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    # Prepend BOS to every encoded prompt, as Llama tokenizers do.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    return fast
