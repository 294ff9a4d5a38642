"""``kvlab.load``: one call that returns model, tokenizer and architecture adapter."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch

from .arch import Adapter, adapter, check_tokenizer
from .text import ensure_pad

DEFAULT_MODEL = "kvlab/world"


class Loaded(NamedTuple):
    """``model, tok, arch = kvlab.load()``."""

    model: torch.nn.Module
    tok: object
    arch: Adapter


def world_model_dir() -> Path:
    """Where the built-in model lives (``data/world/model``; ``$KVLAB_DATA`` overrides ``data/``)."""
    from .world import MODEL_DIR
    return Path(MODEL_DIR)


def hub_name(model) -> str:
    """The last part of the model's name or path, lower-cased ("gpt2-xl" for "openai-community/gpt2-xl")."""
    return str(getattr(model.config, "_name_or_path", "")).lower().rstrip("/").split("/")[-1]


def is_builtin(model) -> bool:
    """True for the built-in world model (loaded from ``data/world/model``)."""
    path = str(getattr(model.config, "_name_or_path", "")).rstrip("/")
    return path.split("/")[-1] == "model" and "world" in path


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """'auto'/None -> cuda if available, else mps, else cpu."""
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}: use float32, float16 or bfloat16") from None


def dtype_kwarg(dtype: torch.dtype) -> dict:
    """The keyword that sets a model's dtype in ``from_pretrained`` / ``from_config`` on the installed
    transformers: ``dtype`` from 4.56 on, ``torch_dtype`` before (5.x warns on the old name)."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


@contextmanager
def quiet_loading():
    """transformers' "Loading weights" progress bar off inside the block, restored after: a bar that a
    notebook's HTML and a log both freeze at 0% says nothing for a load that takes a second."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def load(name_or_path: str | os.PathLike | None = None, device: str | torch.device | None = "auto",
         dtype: str | torch.dtype | None = None, device_map: str | dict | None = None) -> Loaded:
    """Load a causal LM, its tokenizer and its :class:`~kvlab.arch.Adapter`.

    ``None`` or ``"kvlab/world"`` gives the built-in model shipped in ``data/world`` (works
    offline). Anything else is passed to ``transformers`` (a local folder or a hub id such
    as ``"gpt2-xl"``, ``"EleutherAI/gpt-j-6b"``, ``"EleutherAI/pythia-410m"``,
    ``"meta-llama/Llama-2-7b-hf"``). The model is put in eval mode with gradients off.
    Default dtype: float32 on CPU, float16 on GPU. ``device_map`` (e.g. ``"auto"``, needs
    ``accelerate``) spreads a model too large for one GPU over the available devices, in place of
    ``device``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    source = world_model_dir() if name_or_path in (None, DEFAULT_MODEL) else name_or_path
    try:
        tok = AutoTokenizer.from_pretrained(source)
        extra = {} if device_map is None else {"device_map": device_map}
        with quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(source, **dtype_kwarg(dt), **extra)
    except (OSError, ValueError) as e:
        raise OSError(
            f"could not load {str(name_or_path)!r} from {str(source)!r}. If this is a hub id, this machine "
            f"may have no access to the model hub: pass a local folder, or run on Colab. Original error: {e}"
        ) from e
    adapter(model)  # raises UnsupportedArchitecture early, naming the supported families
    check_tokenizer(model, tok)
    ensure_pad(tok)
    if device_map is None:
        model.to(dev)
    model.eval()
    model.requires_grad_(False)
    return Loaded(model, tok, adapter(model))
