"""Where are we running (Colab, CI, local) and what fits: ``kvlab.setup()``."""
from __future__ import annotations

import os
import platform
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

# Rough memory needs for inference in fp16 (weights only, GiB) and where each model fits.
MODEL_TIERS = [
    # (model id, parameters, fp16 GiB, runs on)
    ("kvlab/world (built-in)", "~3M", 0.01, "any CPU, seconds"),
    ("gpt2", "124M", 0.25, "CPU (slow tracing), any GPU"),
    ("gpt2-medium", "355M", 0.7, "CPU (minutes), any GPU"),
    ("EleutherAI/pythia-410m", "405M", 0.8, "CPU (minutes), any GPU"),
    ("gpt2-xl", "1.5B", 3.2, "free Colab T4 (16 GB)"),
    ("EleutherAI/gpt-j-6b", "6B", 12.1, "Colab T4 at the limit; A100 comfortable"),
    ("meta-llama/Llama-2-7b-hf", "6.7B", 13.5, "A100 (40/80 GB); T4 only for inference"),
]


def cache_dir() -> Path:
    """Where kvlab keeps what it computes or downloads (key covariances, ROME's data files):
    ``$KVLAB_CACHE``, else ``$XDG_CACHE_HOME/kvlab``, else ``~/.cache/kvlab``; never the source tree."""
    if os.environ.get("KVLAB_CACHE"):
        return Path(os.environ["KVLAB_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "kvlab"
    return Path.home() / ".cache" / "kvlab"


@dataclass
class Environment:
    kind: str              # "colab", "ci" or "local"
    device: str            # "cuda", "mps" or "cpu"
    gpu: str | None
    gpu_mem_gib: float | None
    cpus: int
    python: str
    torch: str
    transformers: str

    def __str__(self) -> str:
        gpu = f"{self.gpu} ({self.gpu_mem_gib:.0f} GiB)" if self.gpu else "none"
        return (f"environment: {self.kind} | device: {self.device} | GPU: {gpu} | CPUs: {self.cpus} | "
                f"python {self.python}, torch {self.torch}, transformers {self.transformers}")


def environment() -> Environment:
    import transformers

    kind = "colab" if "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ else \
        "ci" if os.environ.get("CI") else "local"
    gpu = mem = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        gpu, mem = p.name, p.total_memory / 2**30
    from .loading import resolve_device
    return Environment(kind, resolve_device("auto").type, gpu, mem, os.cpu_count() or 1,
                       platform.python_version(), torch.__version__, transformers.__version__)


def seed_everything(seed: int = 0) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass


def cpu_threads() -> int:
    """Threads for torch on CPU: ``$KVLAB_THREADS`` if set; 1 on machines with ≤ 2 cores (the course's
    models are small, and two threads on a shared 2-core CI box were measured 10-30× slower under
    load); else torch's default, capped at the core count."""
    value = os.environ.get("KVLAB_THREADS", "").strip()
    if value:
        try:
            threads = int(value)
        except ValueError:
            raise ValueError(f"KVLAB_THREADS={os.environ['KVLAB_THREADS']!r} is not a whole number; set it to "
                             f"the number of CPU threads for torch (e.g. 1 or {os.cpu_count() or 1}), or unset "
                             f"it") from None
        return max(1, threads)
    cores = os.cpu_count() or 1
    if cores <= 2 and not torch.cuda.is_available():
        return 1
    return min(torch.get_num_threads(), cores)


def setup(seed: int = 0, quiet: bool = False) -> Environment:
    """Shared first cell of every notebook: seed, detect the environment, print it.

    Sets torch's CPU threads (:func:`cpu_threads`). Installs nothing: kvlab is already importable
    when this runs (on Colab the notebook's first cell pip-installs kvlab only if ``import kvlab``
    fails).
    """
    seed_everything(seed)
    torch.set_num_threads(cpu_threads())
    env = environment()
    if not quiet:
        print(env)
    return env
