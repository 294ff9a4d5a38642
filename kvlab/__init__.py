"""kvlab: transformer feed-forward layers as key-value memories — locate and edit facts.

    import kvlab
    model, tok, arch = kvlab.load()          # the built-in world model (offline)
    m = kvlab.memory.coefficients(model, tok, "Anna Berg lives in", layer=3)
"""
from __future__ import annotations

__version__ = "0.1.0"

from .arch import Adapter, UnsupportedArchitecture, adapter, SUPPORTED_MODEL_TYPES  # noqa: F401
from .loading import load, Loaded, DEFAULT_MODEL  # noqa: F401
from .env import setup, environment  # noqa: F401
from . import hooks, memory, text  # noqa: F401

_SUBMODULES = {"data", "world", "triggers", "vocab", "lens", "tracing", "neurons", "editing", "lora", "plots",
               "widgets", "course", "testing", "env", "arch", "loading", "checks", "reference", "exercises",
               "standin", "lora_train"}


def __getattr__(name):  # lazy submodules: kvlab.tracing, kvlab.data, ... import on first use
    if name in _SUBMODULES:
        import importlib
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
