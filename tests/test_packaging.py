"""The install is honest: the floors in pyproject.toml are the versions the floor lock tests, the locks
never pin torch or CUDA packages, environment.yml asks for the same ranges, and the built-in model's
files load in every supported transformers version."""
import json
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _name(spec: str) -> str:
    return re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0].strip().lower().replace("_", "-")


def _floor(spec: str) -> str:
    m = re.search(r">=\s*([0-9][^,; ]*)", spec)
    assert m, f"{spec!r} has no floor (>=)"
    return m.group(1)


def _requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [s.split("#")[0].strip() for s in project["dependencies"] + project["optional-dependencies"]["dev"]]


def _pins(lock: str) -> dict[str, str]:
    pins = {}
    for line in (ROOT / lock).read_text().splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, version = line.split(";")[0].strip().split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def _same_version(a: str, b: str) -> bool:
    pad = lambda v: [int(x) for x in v.split(".")] + [0] * (3 - len(v.split(".")))  # noqa: E731
    return pad(a) == pad(b)


@pytest.mark.parametrize("spec", [s for s in _requirements() if _name(s) != "torch"])
def test_floor_is_what_the_floor_lock_tests(spec):
    """Each dependency's floor in pyproject.toml is the version `make compat-floor` installs."""
    pins = _pins("requirements-floor.lock")
    name = _name(spec)
    assert name in pins, f"{name} missing from requirements-floor.lock: run `make lock`"
    assert _same_version(pins[name], _floor(spec)), (
        f"pyproject.toml says {spec!r} but the floor lock tests {name}=={pins[name]}: "
        f"raise the floor to the tested version (or run `make lock`)")


def test_torch_floor_is_the_build_compat_floor_installs():
    """torch is in no lock (Colab keeps its own); its floor is the version `make compat-floor` tests, at most
    2.11 (older than the CPU build `make test` installs)."""
    torch_spec = next(s for s in _requirements() if _name(s) == "torch")
    makefile = (ROOT / "Makefile").read_text()
    floor_torch = re.search(r"^TORCH_FLOOR\s*\?=\s*torch==(\S+)", makefile, re.M).group(1)
    make_torch = re.search(r"^TORCH\s*\?=\s*torch==(\S+)", makefile, re.M).group(1)
    assert _same_version(_floor(torch_spec), ".".join(floor_torch.split(".")[:2]))
    assert [int(x) for x in floor_torch.split(".")[:2]] <= [2, 11] <= [int(x) for x in make_torch.split(".")[:2]]
    for lock in ("requirements.lock", "requirements-floor.lock"):
        pins = _pins(lock)
        assert "torch" not in pins, f"{lock} pins torch"
        assert not [p for p in pins if p.startswith(("nvidia-", "cuda-"))], f"{lock} pins CUDA packages"


def test_lock_satisfies_the_ranges():
    """The newest lock sits inside every range (a lock made before a floor was raised fails here)."""
    pins = _pins("requirements.lock")
    for spec in _requirements():
        name = _name(spec)
        if name == "torch":
            continue
        floor = [int(x) for x in _floor(spec).split(".")]
        have = [int(x) for x in re.match(r"[0-9.]+", pins[name]).group(0).rstrip(".").split(".")]
        assert have >= floor, f"requirements.lock has {name}=={pins[name]}, below {spec!r}"


def test_environment_yml_matches_pyproject():
    text = (ROOT / "environment.yml").read_text()
    pip_specs = [line.strip()[2:].strip() for line in text.split("- pip:")[1].splitlines()
                 if line.strip().startswith("- ") and not line.strip().startswith("- -e")]
    assert sorted(pip_specs) == sorted(s.replace(" ", "") for s in _requirements())
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert f"python{requires}" in text.replace(" ", "")


def test_builtin_tokenizer_config_loads_everywhere():
    """transformers 5 writes "TokenizersBackend", a class 4.x does not have."""
    from kvlab.world import MODEL_DIR
    from kvlab.world.tokenizer import PORTABLE_CLASS

    config = json.loads((Path(MODEL_DIR) / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == PORTABLE_CLASS == "PreTrainedTokenizerFast"
    assert "backend" not in config


def test_save_tokenizer_writes_portable_config(tmp_path):
    from kvlab.world.tokenizer import save_tokenizer, world_tokenizer

    save_tokenizer(world_tokenizer(), tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and "backend" not in config
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok("Anna lives in")["input_ids"] == world_tokenizer()("Anna lives in")["input_ids"]


def test_dtype_keyword_follows_transformers_version(monkeypatch):
    import torch
    import transformers

    from kvlab.loading import dtype_kwarg

    for version, key in (("4.55.4", "torch_dtype"), ("4.56.0", "dtype"), ("5.24.0", "dtype"),
                         ("4.57.0.dev0", "dtype")):
        monkeypatch.setattr(transformers, "__version__", version)
        assert dtype_kwarg(torch.float16) == {key: torch.float16}


def test_load_with_device_map_keeps_the_model_where_accelerate_put_it():
    import kvlab
    model, tok, arch = kvlab.load(device_map={"": "cpu"}, dtype="float32")
    assert next(model.parameters()).device.type == "cpu" and not model.training
    assert kvlab.memory.coefficients(model, tok, "Uwe Keller was born in", layers=0).shape[-1] == arch.d_ff
