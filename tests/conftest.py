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


# --- the device/dtype tier (tests/test_devices.py, marker "devices") ------------------------------------------
#
#   KVLAB_TEST_DEVICE   cpu (default), cuda, cuda:N or mps: where the tier's models live
#   KVLAB_TEST_DTYPES   comma list of float32, float16, bfloat16: the dtypes it runs in. Unset or empty: the
#                       tier is off (one skip line), so a plain `pytest` is as fast as before.
#
#   KVLAB_TEST_DTYPES=float16,bfloat16 python -m pytest -q -m devices tests/test_devices.py          (make test-lowp)
#   KVLAB_TEST_DEVICE=cuda KVLAB_TEST_DTYPES=float16,bfloat16,float32 python -m pytest -q -m devices  (make test-gpu)
#
# KVLAB_TEST_MARGINS=FILE appends one JSON line per tolerance check (test, error, bound) to FILE: how close to
# its bound each comparison came on this device, for tuning and for reports.

TIER_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TIER_DEVICES = ("cpu", "cuda", "mps")


def tier_settings() -> tuple[torch.device, list[str]] | None:
    """(device, dtype names) of the tier from the environment, None when it is off. Bad values raise
    ``pytest.UsageError`` naming the value and what is accepted; an unavailable device too."""
    raw = os.environ.get("KVLAB_TEST_DTYPES", "").strip()
    if not raw:
        return None
    names = [d.strip() for d in raw.split(",") if d.strip()]
    bad = [d for d in names if d not in TIER_DTYPES]
    if bad or not names:
        raise pytest.UsageError(f"KVLAB_TEST_DTYPES={raw!r}: {', '.join(map(repr, bad)) or 'no dtype'} not "
                                f"understood; give a comma list of {', '.join(TIER_DTYPES)}")
    dev = os.environ.get("KVLAB_TEST_DEVICE", "cpu").strip() or "cpu"
    try:
        device = torch.device(dev)
    except RuntimeError:
        device = None
    if device is None or device.type not in TIER_DEVICES:
        raise pytest.UsageError(f"KVLAB_TEST_DEVICE={dev!r} not understood; use one of {', '.join(TIER_DEVICES)} "
                                f"(cuda:N for a given GPU)")
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
    if not available[device.type]:
        raise pytest.UsageError(f"KVLAB_TEST_DEVICE={dev!r}: no {device.type} device in this torch "
                                f"({torch.__version__}); unset it to run the tier on the CPU")
    return device, list(dict.fromkeys(names))


try:
    _TIER, _TIER_ERROR = tier_settings(), None
except pytest.UsageError as e:
    _TIER, _TIER_ERROR = None, e


def pytest_configure(config):
    if not any(str(m).startswith("devices:") for m in config.getini("markers")):
        config.addinivalue_line("markers", "devices: the device/dtype tier (tests/test_devices.py): "
                                           "KVLAB_TEST_DEVICE, KVLAB_TEST_DTYPES")
    if _TIER_ERROR is not None:            # a mistyped setting stops the run before any test, saying why
        raise _TIER_ERROR


def pytest_report_header(config):
    if _TIER is not None:
        return f"kvlab device tier: {_TIER[0]}, {', '.join(_TIER[1])}"


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The tier's device (KVLAB_TEST_DEVICE)."""
    if _TIER is None:
        pytest.skip("the device/dtype tier is off: set KVLAB_TEST_DTYPES")
    return torch.empty(0, device=_TIER[0]).device           # "cuda" -> "cuda:0", as the weights report it


@pytest.fixture(scope="module", params=_TIER[1] if _TIER else [])
def dtype(request) -> torch.dtype:
    """Each of the tier's dtypes (KVLAB_TEST_DTYPES) in turn; module-scoped, so models built for one dtype are
    shared by the module's tests."""
    return TIER_DTYPES[request.param]


@pytest.fixture(scope="module")
def on_device(device, dtype):
    """``on_device(family, **sizes)``: :func:`kvlab.testing.tiny` moved with ``.to(device, dtype)``, one per
    (family, sizes) and dtype, shared within the module. Tests that change weights must leave them as they were
    (every kvlab edit undoes bit-for-bit)."""
    from kvlab.testing import tiny

    built = {}

    def make(family: str, **sizes):
        key = (family, tuple(sorted(sizes.items())))
        if key not in built:
            model, tok, arch = loaded = tiny(family, **sizes)
            model.to(device, dtype)
            built[key] = loaded
        return built[key]
    return make


@pytest.fixture(scope="module")
def world(device, dtype):
    """The built-in model, ``kvlab.load(device=..., dtype=...)`` (skipped when it is not in data/world/model)."""
    import kvlab
    from kvlab.loading import world_model_dir

    if not (world_model_dir() / "config.json").exists():
        pytest.skip(f"built-in model not found at {world_model_dir()} (train it: python -m kvlab.world train)")
    return kvlab.load(device=device, dtype=dtype)


@pytest.fixture
def within(request):
    """``within(what, err, bound)``: assert err ≤ bound (NaN fails), naming both; with KVLAB_TEST_MARGINS set,
    also record them (see above). Returns err."""
    import json

    def check(what: str, err, bound: float) -> float:
        err = float(err.detach().abs().max()) if torch.is_tensor(err) else float(err)
        path = os.environ.get("KVLAB_TEST_MARGINS")
        if path:
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"test": request.node.nodeid, "what": what, "err": err, "bound": bound}) + "\n")
        assert err <= bound, f"{what}: error {err:.3g} > bound {bound:.3g}"      # also fails on NaN
        return err
    return check
