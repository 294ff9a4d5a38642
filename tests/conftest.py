import os

# No model hub is reachable in CI: fail fast instead of retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

# One thread: on a busy 2-core machine two threads per process thrash (measured 10-30x slower).
torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _kvlab_cache(tmp_path_factory):
    """Caches (the key covariance C) go to a temporary folder: never the repository or ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("KVLAB_CACHE", str(tmp_path_factory.mktemp("kvlab-cache")))
    yield
    mp.undo()
