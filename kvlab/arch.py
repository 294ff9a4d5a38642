"""Architecture adapters: where each model family keeps its layers, FFN keys and values.

Geva et al. (2021) write a feed-forward layer as a key-value memory

    FF(x) = f(x · Kᵀ) · V          K, V: (d_ff, d_model)

Row i of K is the key k_i, row i of V is the value v_i and m_i = f(x · k_i) is the
memory coefficient. Every family below stores K and V differently (GPT-2 uses a
transposed ``Conv1D``, the others ``nn.Linear``; Llama-style models have a gated FFN
with two key matrices). An :class:`Adapter` hides those differences so the rest of
kvlab can say ``arch.value_matrix(layer)`` and get a ``(d_ff, d_model)`` view.

One fact holds for every family and kvlab relies on it: **the input of the value
projection is the coefficient vector m** (batch, seq, d_ff). Hooking that input reads
the memory coefficients; patching it intervenes on them.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class Family:
    """Static description of one model family: dotted paths relative to the model."""

    name: str
    model_types: tuple[str, ...]
    layers: str                 # ModuleList of blocks
    final_norm: str             # norm applied before the unembedding
    mlp: str                    # within a block
    attn: str                   # within a block
    mlp_norm: str               # within a block: the norm whose output the FFN reads
    keys: tuple[str, ...]       # within the MLP: key projections (gate first for gated FFNs)
    value: str                  # within the MLP: value projection
    act: str                    # within the MLP: activation module
    attn_modules: tuple[str, ...]  # within a block: attention projections (for LoRA roles)
    conv1d: bool = False        # weights stored (in, out) instead of nn.Linear's (out, in)
    gated: bool = False         # m = act(gate·x) * (up·x)
    parallel: bool | str = False  # attention and FFN read the same residual (bool, or config attr)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("gpt2", ("gpt2",), "transformer.h", "transformer.ln_f", "mlp", "attn", "ln_2",
               ("c_fc",), "c_proj", "act", ("attn.c_attn", "attn.c_proj"), conv1d=True),
        Family("gptj", ("gptj",), "transformer.h", "transformer.ln_f", "mlp", "attn", "ln_1",
               ("fc_in",), "fc_out", "act", ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"),
               parallel=True),
        Family("gpt_neo", ("gpt_neo",), "transformer.h", "transformer.ln_f", "mlp", "attn", "ln_2",
               ("c_fc",), "c_proj", "act",
               ("attn.attention.q_proj", "attn.attention.k_proj", "attn.attention.v_proj",
                "attn.attention.out_proj")),
        Family("gpt_neox", ("gpt_neox",), "gpt_neox.layers", "gpt_neox.final_layer_norm", "mlp", "attention",
               "post_attention_layernorm", ("dense_h_to_4h",), "dense_4h_to_h", "act",
               ("attention.query_key_value", "attention.dense"), parallel="use_parallel_residual"),
        Family("llama", ("llama", "mistral", "qwen2"), "model.layers", "model.norm", "mlp", "self_attn",
               "post_attention_layernorm", ("gate_proj", "up_proj"), "down_proj", "act_fn",
               ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
               gated=True),
    ]
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for f in FAMILIES.values() for t in f.model_types)


class UnsupportedArchitecture(ValueError):
    """Raised for a model whose family kvlab has no adapter for."""


class LayerError(ValueError):
    """A layer that is not an int, or a ``layers`` argument that is empty or a string."""


class LayerOutOfRange(LayerError, IndexError):
    """A layer index outside the model (also an IndexError, as indexing a list would raise)."""


def _get(root: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


class Adapter:
    """Uniform access to one loaded model's layers, norms, embeddings and FFN memories.

    All matrices are returned in the memory convention of Geva et al.: keys and values
    as ``(d_ff, d_model)`` tensors whose row i belongs to memory cell i. They are *views*
    of the real parameters where possible, so in-place edits reach the model.
    """

    def __init__(self, model: nn.Module):
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        family = next((f for f in FAMILIES.values() if model_type in f.model_types), None)
        if family is None:
            raise UnsupportedArchitecture(
                f"kvlab has no adapter for model_type={model_type!r} ({type(model).__name__}). "
                f"Supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}."
            )
        try:
            _get(model, family.layers)
            has_head = model.get_output_embeddings() is not None
        except AttributeError:
            has_head = False
        if not has_head:
            raise UnsupportedArchitecture(
                f"{type(model).__name__} is a {family.name} model without a language-model head: kvlab needs a "
                f"causal LM (e.g. {family.name} loaded with AutoModelForCausalLM, not AutoModel)."
            )
        self.model = model
        self.family = family
        self.config = model.config

    # --- sizes -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.family.name

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        return self.embed.weight.shape[1]

    @property
    def d_ff(self) -> int:
        return self.value_module(0).weight.shape[0 if self.family.conv1d else 1]

    @property
    def parallel(self) -> bool:
        p = self.family.parallel
        return bool(getattr(self.config, p, True)) if isinstance(p, str) else p

    # --- modules -----------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        return _get(self.model, self.family.layers)

    @property
    def embed(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    @property
    def unembed(self) -> nn.Module:
        return self.model.get_output_embeddings()

    @property
    def final_norm(self) -> nn.Module:
        return _get(self.model, self.family.final_norm)

    def layer(self, l: int) -> nn.Module:
        return self.layers[self._check_layer(l)]

    def mlp(self, l: int) -> nn.Module:
        return _get(self.layer(l), self.family.mlp)

    def attn(self, l: int) -> nn.Module:
        return _get(self.layer(l), self.family.attn)

    def mlp_norm(self, l: int) -> nn.Module:
        return _get(self.layer(l), self.family.mlp_norm)

    def key_modules(self, l: int) -> list[nn.Module]:
        """The key projection(s): [c_fc] / [fc_in] / [dense_h_to_4h] / [gate_proj, up_proj]."""
        return [_get(self.mlp(l), k) for k in self.family.keys]

    def value_module(self, l: int) -> nn.Module:
        """The value projection whose *input* is the coefficient vector m."""
        return _get(self.mlp(l), self.family.value)

    def act(self, l: int) -> nn.Module:
        return _get(self.mlp(l), self.family.act)

    def module_name(self, module: nn.Module) -> str:
        """Fully qualified name of a submodule (e.g. ``transformer.h.3.mlp.c_proj``)."""
        for name, m in self.model.named_modules():
            if m is module:
                return name
        raise ValueError("module is not part of this model")

    # --- names, for peft/LoRA and optimisers -------------------------------------------
    def key_names(self) -> tuple[str, ...]:
        """Leaf module names of the FFN keys, as peft's ``target_modules`` expects."""
        return tuple(k.split(".")[-1] for k in self.family.keys)

    def value_names(self) -> tuple[str, ...]:
        return (self.family.value.split(".")[-1],)

    def attention_names(self) -> tuple[str, ...]:
        return tuple(a.split(".")[-1] for a in self.family.attn_modules)

    # --- memories ------------------------------------------------------------------------
    def _as_memory(self, module: nn.Module, is_value: bool) -> torch.Tensor:
        w = module.weight
        # Conv1D stores (in, out); Linear stores (out, in). Memory convention: (d_ff, d_model).
        if self.family.conv1d:
            return w if is_value else w.T
        return w.T if is_value else w

    def key_matrices(self, l: int) -> list[torch.Tensor]:
        """Key matrices of layer l, each (d_ff, d_model) (gate then up for gated FFNs)."""
        return [self._as_memory(m, is_value=False) for m in self.key_modules(l)]

    def key_matrix(self, l: int) -> torch.Tensor:
        """The (first) key matrix K of layer l, (d_ff, d_model); for gated FFNs the gate keys."""
        return self.key_matrices(l)[0]

    def key_biases(self, l: int) -> list[torch.Tensor | None]:
        return [m.bias for m in self.key_modules(l)]

    def value_matrix(self, l: int) -> torch.Tensor:
        """Value matrix V of layer l, (d_ff, d_model): row i is v_i. A view of the weight."""
        return self._as_memory(self.value_module(l), is_value=True)

    def value_bias(self, l: int) -> torch.Tensor | None:
        return self.value_module(l).bias

    def memory_layers(self) -> list[int]:
        """The layers whose FFN writes anything: value matrix or bias not all zero. An empty FFN (the
        built-in model's layer 0, held at zero in training) stores no memories, so the analyses of keys
        and values (notebooks 02-04) leave it out."""
        def live(l: int) -> bool:
            b = self.value_bias(l)
            return bool(self.value_matrix(l).detach().any()) or (b is not None and bool(b.detach().any()))
        return [l for l in range(self.n_layers) if live(l)]

    def coefficients_from_input(self, l: int, x: torch.Tensor) -> torch.Tensor:
        """m = f(x·Kᵀ + b) from the FFN input x (already normed). (..., d_model) -> (..., d_ff)."""
        act = self.act(l)
        outs = [x @ K.T + (b if b is not None else 0) for K, b in zip(self.key_matrices(l), self.key_biases(l))]
        if self.family.gated:
            gate, up = outs
            return act(gate) * up
        return act(outs[0])

    def check_layer(self, l) -> int:
        """One layer index as a non-negative int: an int (numpy/torch integer scalars too, not bool);
        negatives count from the end. Raises :class:`LayerError` / :class:`LayerOutOfRange`."""
        n = len(_get(self.model, self.family.layers))
        is_bool = type(l).__name__ in ("bool", "bool_") or getattr(l, "dtype", None) == torch.bool
        try:
            if is_bool or getattr(l, "ndim", 0) != 0:    # True would index layer 1; tensor([2]) is not a scalar
                raise TypeError
            i = operator.index(l)
        except TypeError:
            raise LayerError(f"a layer must be an int, got {l!r} ({type(l).__name__})") from None
        if not -n <= i < n:
            raise LayerOutOfRange(f"layer {i} out of range: the model has {n} layers (0..{n - 1}, "
                                  f"or -{n}..-1 from the end)")
        return i % n

    _check_layer = check_layer   # the old name, still used across kvlab

    def check_layers(self, layers=None) -> list[int]:
        """Sorted, distinct layer indices: ``None`` = all, one layer or a non-empty iterable of layers
        (each as :meth:`check_layer` accepts). A string is rejected, not read digit by digit."""
        if layers is None:
            return list(range(self.n_layers))
        if isinstance(layers, (str, bytes)):
            raise LayerError(f"layers must be an int or a list of ints, got the string {layers!r}")
        try:
            ls = list(layers)
        except TypeError:       # one layer (an int, a numpy/torch integer scalar), or a bad value check_layer names
            ls = [layers]
        if not ls:
            raise LayerError("no layers given: pass None for all layers, or a non-empty list")
        return sorted({self.check_layer(l) for l in ls})

    def __repr__(self) -> str:
        return (f"Adapter(family={self.name!r}, n_layers={self.n_layers}, d_model={self.d_model}, "
                f"d_ff={self.d_ff}, gated={self.family.gated}, parallel={self.parallel})")


def adapter(model: nn.Module) -> Adapter:
    """The adapter for a model (cached on the model object)."""
    a = getattr(model, "_kvlab_adapter", None)
    if a is None or a.model is not model:
        a = Adapter(model)
        object.__setattr__(model, "_kvlab_adapter", a)  # plain attribute, not a submodule
    return a


def check_tokenizer(model: nn.Module, tokenizer) -> None:
    """Raise if the tokenizer cannot belong to the model (its ids would index past the embedding)."""
    if not hasattr(model, "get_input_embeddings") or not hasattr(tokenizer, "__len__"):
        raise ValueError(f"expected a model and its tokenizer, in that order; got {type(model).__name__} "
                         f"and {type(tokenizer).__name__}")
    n_vocab = model.get_input_embeddings().weight.shape[0]
    n_tok = len(tokenizer)
    if n_tok > n_vocab:
        raise ValueError(
            f"model/tokenizer mismatch: the tokenizer has {n_tok} tokens but the model's embedding has "
            f"only {n_vocab} rows ({type(model).__name__}, {getattr(tokenizer, 'name_or_path', '?')}); "
            f"load both from the same checkpoint."
        )


def check_layers(model: nn.Module, layers=None) -> list[int]:
    """:meth:`Adapter.check_layers` for ``model``: sorted, distinct, validated layer indices."""
    return adapter(model).check_layers(layers)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


Activation = Callable[[torch.Tensor], torch.Tensor]
