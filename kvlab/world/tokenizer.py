"""A word-level tokenizer for the world, built with the ``tokenizers`` library.

Words carry a leading-space marker "▁" (as in SentencePiece), so text round-trips exactly,
a word is the same token at the start of a text and after a space (``"Paris"`` and
``" Paris"`` both give ``▁Paris``), and punctuation is split off (``"Kelmor."`` ->
``▁Kelmor`` ``.``). ``<|endoftext|>`` is bos, eos and pad; unknown words map to ``<unk>``.
"""
from __future__ import annotations

from pathlib import Path

EOT = "<|endoftext|>"
UNK = "<unk>"


def _pre_tokenizer():
    from tokenizers import pre_tokenizers
    return pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        pre_tokenizers.Punctuation(behavior="isolated"),
    ])


def build_tokenizer(text: str):
    """A ``PreTrainedTokenizerFast`` whose vocabulary is every word of ``text``.

    Ids: 0 = ``<|endoftext|>``, 1 = ``<unk>``, 2 = "▁" (a lone space), then words in
    order of first appearance (deterministic).
    """
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {EOT: 0, UNK: 1, "▁": 2}
    for piece, _ in _pre_tokenizer().pre_tokenize_str(text):
        vocab.setdefault(piece, len(vocab))
        if piece.startswith("▁") and len(piece) > 1:   # punctuation after a space, e.g. "▁,"
            pass
    for p in ".,;:!?'\"-()":
        vocab.setdefault(p, len(vocab))
    t = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    t.pre_tokenizer = _pre_tokenizer()
    t.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token=EOT, eos_token=EOT, pad_token=EOT,
                                   unk_token=UNK, padding_side="right", model_max_length=128,
                                   clean_up_tokenization_spaces=False)


def world_tokenizer(version: int | None = None):
    """The tokenizer for any world of ``version`` (default: the shipped model's; the vocabulary does
    not depend on the seed)."""
    from .generator import VERSION, lexicon
    return build_tokenizer(lexicon(VERSION if version is None else version))


# The class name written to tokenizer_config.json: one that transformers 4 and 5 both load (5 writes its
# own "TokenizersBackend", which 4.x does not know).
PORTABLE_CLASS = "PreTrainedTokenizerFast"


def save_tokenizer(tok, out_dir: str | Path) -> None:
    """Write tokenizer.json and a tokenizer_config.json that every supported transformers version loads."""
    import json

    tok.save_pretrained(str(out_dir))
    path = Path(out_dir) / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = PORTABLE_CLASS
    config.pop("backend", None)           # a transformers-5-only key
    path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
