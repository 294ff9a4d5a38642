"""Tiny, randomly initialised models of every supported family, built offline.

Used by the tests (and handy in notebooks) to check that a method works on GPT-2,
GPT-J, GPT-Neo, GPT-NeoX/Pythia and Llama-style models without downloading anything.
"""
from __future__ import annotations

import contextlib

import torch

from .loading import Loaded, dtype_kwarg
from .arch import adapter
from .text import ensure_pad

WORDS = ("the a of in is was and to on at by city river king queen paris rome berlin london france "
         "italy germany england french italian german english anna berg tom lee lives works plays "
         "speaks born capital language piano guitar football tennis doctor teacher red blue one two "
         "three four five six seven eight nine ten").split()

FAMILIES = ("gpt2", "gptj", "gpt_neo", "gpt_neox", "llama", "mistral", "qwen2")


def tiny_tokenizer():
    """A word-level fast tokenizer over :data:`WORDS` (GPT-2-style leading-space words)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<unk>": 1}
    for w in WORDS:
        for form in ("▁" + w, w):
            vocab.setdefault(form, len(vocab))
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    t.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    tok = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                  unk_token="<unk>", pad_token="<|endoftext|>")
    ensure_pad(tok)
    return tok


def bpe_tokenizer():
    """A byte-level BPE tokenizer trained offline on a few sentences (GPT-2-like: unseen words split into
    pieces, leading-space tokens), for subword cases the word-level :func:`tiny_tokenizer` cannot show."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.post_processor = processors.ByteLevel(trim_offsets=True)
    corpus = ["the city of paris is in france", "the eiffel tower is in paris", "rome is the capital"] * 20
    t.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>")


def tiny_config(family: str, vocab_size: int, d: int = 32, n_layers: int = 3, d_ff: int = 64, heads: int = 4,
                positions: int = 64):
    import transformers as T

    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if family == "gpt2":
        return T.GPT2Config(n_layer=n_layers, n_embd=d, n_head=heads, n_inner=d_ff, n_positions=positions,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    if family == "gptj":
        return T.GPTJConfig(n_layer=n_layers, n_embd=d, n_head=heads, n_inner=d_ff, n_positions=positions,
                            rotary_dim=d // heads // 2 * 2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            **common)
    if family == "gpt_neo":
        return T.GPTNeoConfig(num_layers=n_layers, hidden_size=d, num_heads=heads, intermediate_size=d_ff,
                              max_position_embeddings=positions, attention_types=[[["global", "local"], 1]]
                              if n_layers == 2 else [[["global"], n_layers]], window_size=16,
                              resid_dropout=0.0, embed_dropout=0.0, attention_dropout=0.0, **common)
    if family == "gpt_neox":
        return T.GPTNeoXConfig(num_hidden_layers=n_layers, hidden_size=d, num_attention_heads=heads,
                               intermediate_size=d_ff, max_position_embeddings=positions, rotary_pct=0.5,
                               use_parallel_residual=True, **common)
    cls = {"llama": T.LlamaConfig, "mistral": T.MistralConfig, "qwen2": T.Qwen2Config}[family]
    return cls(num_hidden_layers=n_layers, hidden_size=d, num_attention_heads=heads, num_key_value_heads=heads // 2,
               intermediate_size=d_ff, max_position_embeddings=positions, tie_word_embeddings=False, **common)


def tiny(family: str = "gpt2", seed: int = 0, **sizes) -> Loaded:
    """A random tiny model of ``family`` with :func:`tiny_tokenizer`, in eval mode, float32."""
    from transformers import AutoModelForCausalLM

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = tiny_config(family, len(tok), **sizes)
    cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg, **dtype_kwarg(torch.float32))
    # Random init gives tiny weights; make values/keys larger so coefficients are non-trivial.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    model.eval().requires_grad_(False)
    return Loaded(model, tok, adapter(model))


@contextlib.contextmanager
def cache_ignored(module):
    """Within the block, ``module`` (an attention layer) gets every cache argument as None, whatever it is
    called (``past_key_value(s)``, ``cache``): a model whose attention never fills the cache, for testing the
    fast paths' fallback. The original ``forward`` is restored on exit, also on error."""
    forward = module.forward

    def no_cache(*args, **kwargs):
        for name in list(kwargs):
            if "past" in name or name == "cache":
                kwargs[name] = None
        return forward(*args, **kwargs)

    module.forward = no_cache
    try:
        yield module
    finally:
        del module.forward
