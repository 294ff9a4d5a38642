"""The covariance cache: keyed by exactly what determines C, bounded, atomic, out of the source tree."""
import os
import pickle
import random
import re
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

import kvlab
from kvlab import checks
from kvlab.arch import adapter
from kvlab.editing import EditRequest, apply_rome, current_answer, key_covariance
from kvlab.editing.memit import apply_memit
from kvlab.editing import covariance as cov
from kvlab.testing import WORDS, tiny

_rng = random.Random(1)
TEXTS = [" ".join(_rng.choice(WORDS) for _ in range(_rng.randint(4, 14))) for _ in range(40)]
OTHER = [" ".join(_rng.choice(WORDS) for _ in range(10)) for _ in range(40)]
TEMPLATES = ["{}", "one two three. {}"]


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    """An empty cache folder and memory for every test."""
    monkeypatch.setenv("KVLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("KVLAB_CACHE_MAX_MB", raising=False)
    monkeypatch.delenv("KVLAB_CACHE_MEMORY_MB", raising=False)
    cov._MEMORY.clear()
    monkeypatch.setattr(cov, "_WARNED", set(), raising=False)  # "warn once" starts afresh
    yield tmp_path / "cache"
    cov._MEMORY.clear()


def files(folder: Path) -> list[Path]:
    return sorted(folder.glob("cov_*.pt")) if folder.exists() else []


def C_of(model, tok, layer=1, texts=TEXTS, **kw):
    return key_covariance(model, tok, layer, texts=texts, progress=False, **kw)


def assert_fresh(model, tok, layer=1, texts=TEXTS):
    """The cached answer equals a recomputation."""
    torch.testing.assert_close(C_of(model, tok, layer, texts), C_of(model, tok, layer, texts, cache=False))


# --- the key -----------------------------------------------------------------------------
@pytest.mark.parametrize("change", ["embedding", "lower block", "attention of the layer", "key of the layer"])
def test_changes_below_the_value_input_give_a_fresh_C(change):
    model, tok, arch = tiny("gpt2", d=64, d_ff=256)  # big enough that a strided sample skips entries
    C = C_of(model, tok)
    with torch.no_grad():
        if change == "embedding":
            arch.embed.weight.mul_(1.3)
        elif change == "lower block":
            arch.key_matrix(0)[3, 5] += 3.0          # one entry
        elif change == "attention of the layer":
            arch.attn(1).c_attn.weight.mul_(1.5)
        else:
            arch.key_matrix(1)[5, 3] += 3.0          # one entry of the layer's own keys
    assert not torch.allclose(C_of(model, tok, cache=False), C)
    assert_fresh(model, tok)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama"])
def test_fingerprint_sees_one_entry_below_and_ignores_the_value_matrix(family):
    model, tok, arch = tiny(family)
    fp = cov.model_fingerprint(model, 1)
    with torch.no_grad():
        arch.value_matrix(1).mul_(2.0).add_(1.0)     # the layer's values: C does not depend on them
        if arch.value_bias(1) is not None:
            arch.value_bias(1).add_(1.0)
        arch.value_matrix(2).mul_(2.0)               # nor on anything above
        arch.key_matrix(2).mul_(2.0)
        arch.final_norm.weight.mul_(2.0)
    assert cov.model_fingerprint(model, 1) == fp
    for t in (arch.embed.weight, arch.key_matrix(0), arch.value_matrix(0), arch.key_matrix(1)):
        with torch.no_grad():
            old = t[2, 3].clone()
            t[2, 3] = torch.nextafter(old, old + 1)  # the smallest possible change of one entry
        assert cov.model_fingerprint(model, 1) != fp
        with torch.no_grad():
            t[2, 3] = old
        assert cov.model_fingerprint(model, 1) == fp


@pytest.mark.parametrize("family", ["gptj", "gpt_neox"])
def test_parallel_block_attention_does_not_touch_the_key_or_C(family):
    """In a parallel block the FFN reads the block input, so the layer's attention is not in the key."""
    model, tok, arch = tiny(family)
    assert arch.parallel
    C, key = C_of(model, tok, cache=False), cov.cache_key(model, tok, 1, TEXTS, 128)
    with torch.no_grad():
        for p in arch.attn(1).parameters():
            p.mul_(1.7)
    assert cov.cache_key(model, tok, 1, TEXTS, 128) == key
    torch.testing.assert_close(C_of(model, tok, cache=False), C, rtol=0, atol=0)


def test_sequential_value_edits_reuse_one_file(fresh_cache):
    model, tok, arch = tiny("gpt2")
    C = C_of(model, tok)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):                               # what sequential ROME does at layer 1
        with torch.no_grad():
            arch.value_matrix(1).add_(torch.outer(torch.randn(arch.d_ff, generator=g),
                                                  torch.randn(arch.d_model, generator=g)))
        cov._MEMORY.clear()
        torch.testing.assert_close(C_of(model, tok), C)
    assert len(files(fresh_cache)) == 1


def test_key_covers_corpus_and_length_but_not_batch_size(fresh_cache):
    model, tok, _ = tiny("gpt2")
    key = cov.cache_key(model, tok, 1, TEXTS, 128)
    assert cov.cache_key(model, tok, 1, TEXTS[:-1], 128) != key
    assert cov.cache_key(model, tok, 1, OTHER, 128) != key
    assert cov.cache_key(model, tok, 1, TEXTS, 5) != key
    assert cov.cache_key(model, tok, 2, TEXTS, 128) != key
    C = C_of(model, tok, batch_size=64)
    # padding is masked: the batch size changes C only by float rounding, so it shares the file. The keys
    # are float32 (from other matrix shapes per batch size): 64 float32 ulps of C's largest entry
    torch.testing.assert_close(C_of(model, tok, batch_size=1, cache=False), C, rtol=0,
                               atol=checks.tolerance(torch.float32, scale=C))
    assert C_of(model, tok, batch_size=1) is C and len(files(fresh_cache)) == 1
    assert files(fresh_cache)[0].stem == key


def test_tensor_digest_sees_every_bit():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        t = torch.randn(3, 50_000, generator=g).to(dtype)
        d, s = cov.tensor_digest(t), cov.checksums(t)
        for i in (0, 77_777, t.numel() - 1):
            u = t.clone().view(-1)
            u[i] = torch.nextafter(u[i], u[i] + 1)
            assert cov.tensor_digest(u.view_as(t)) != d
            assert not torch.equal(cov.checksums(u), s)
        assert cov.tensor_digest(t.reshape(50_000, 3)) != d   # shape counts
        assert cov.tensor_digest(t.clone()) == d and torch.equal(cov.checksums(t.clone()), s)
    x = torch.randn(64, 48, generator=g)
    assert torch.equal(cov.checksums(x.T), cov.checksums(x.T.contiguous()))  # strides do not matter
    assert cov.checksums(torch.zeros(0)).shape == (0, 2)
    assert cov.tensor_digest(torch.tensor(True)) != cov.tensor_digest(torch.tensor(False))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_checksums_are_exact_on_the_gpu():
    t = torch.randn(5_000_000)
    assert torch.equal(cov.checksums(t.cuda()), cov.checksums(t))
    model, tok, _ = tiny("llama")
    fp = cov.model_fingerprint(model.cuda(), 1)
    assert cov.model_fingerprint(model, 1) == fp
    with torch.no_grad():
        adapter(model).embed.weight[1, 1] += 1e-3
    assert cov.model_fingerprint(model, 1) != fp


# --- bounded -------------------------------------------------------------------------------
def test_disk_cache_evicts_least_recently_used(fresh_cache, monkeypatch):
    model, tok, arch = tiny("gpt2")
    size = arch.d_ff ** 2 * 8                       # one C: 32 KiB (+ a little zip overhead)
    monkeypatch.setenv("KVLAB_CACHE_MAX_MB", str(2.5 * size / 2**20))  # room for two
    A = C_of(model, tok, texts=TEXTS)
    C_of(model, tok, texts=OTHER)
    fa, fb = (fresh_cache / f"{cov.cache_key(model, tok, 1, t, 128)}.pt" for t in (TEXTS, OTHER))
    os.utime(fa, (100, 100))
    os.utime(fb, (200, 200))                        # B used more recently than A ...
    cov._MEMORY.clear()
    torch.testing.assert_close(C_of(model, tok, texts=TEXTS), A)  # ... until A is read again
    C_of(model, tok, texts=TEXTS[:20])
    assert fa.exists() and not fb.exists() and len(files(fresh_cache)) == 2
    monkeypatch.setenv("KVLAB_CACHE_MAX_MB", "0")   # 0: no disk cache
    C_of(model, tok, texts=OTHER[:20])
    assert files(fresh_cache) == []
    monkeypatch.setenv("KVLAB_CACHE_MAX_MB", "lots")
    with pytest.raises(ValueError, match="KVLAB_CACHE_MAX_MB must be a number"):
        C_of(model, tok, texts=OTHER[:10])


def test_memory_cache_is_bounded(monkeypatch):
    model, tok, arch = tiny("gpt2")
    monkeypatch.setenv("KVLAB_CACHE_MEMORY_MB", str(1.5 * arch.d_ff ** 2 * 8 / 2**20))  # room for one
    for texts in (TEXTS, OTHER, TEXTS[:20]):
        C_of(model, tok, texts=texts)
    assert len(cov._MEMORY) == 1


# --- atomic, robust ------------------------------------------------------------------------
def test_failed_write_leaves_no_partial_file(fresh_cache, monkeypatch):
    model, tok, _ = tiny("gpt2")
    real_save = torch.save

    def dying_save(obj, f, *a, **kw):               # the disk fills up halfway through
        if hasattr(f, "write"):
            f.write(b"PK\x03\x04 half a zip")
        else:
            Path(f).write_bytes(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.warns(RuntimeWarning, match="cannot write the covariance cache"):
        C = C_of(model, tok)
    monkeypatch.setattr(torch, "save", real_save)
    assert list(fresh_cache.iterdir()) == []        # neither the target nor a temporary file
    cov._MEMORY.clear()
    torch.testing.assert_close(C_of(model, tok), C)
    assert [p.name for p in fresh_cache.iterdir()] == [files(fresh_cache)[0].name]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "not a tensor", "wrong shape", "pickle"])
def test_corrupt_file_is_removed_and_recomputed(fresh_cache, damage):
    model, tok, arch = tiny("gpt2")
    C = C_of(model, tok)
    (path,) = files(fresh_cache)
    if damage == "garbage":
        path.write_bytes(os.urandom(1000))
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    elif damage == "not a tensor":
        torch.save({"C": C}, path)
    elif damage == "wrong shape":
        torch.save(torch.zeros(3, 3, dtype=torch.float64), path)
    else:                                           # code that must never run on load
        path.write_bytes(pickle.dumps(_Boom(), protocol=2))
    cov._MEMORY.clear()
    with pytest.warns(RuntimeWarning, match="removing"):
        torch.testing.assert_close(C_of(model, tok), C)
    assert "KVLAB_TEST_BOOM" not in os.environ
    torch.testing.assert_close(torch.load(path, weights_only=True), C)  # rewritten
    cov._MEMORY.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(C_of(model, tok), C)


class _Boom:
    def __reduce__(self):
        return (exec, ("import os; os.environ['KVLAB_TEST_BOOM'] = '1'",))


def test_no_torch_load_without_weights_only():
    root = Path(kvlab.__file__).parent
    calls = [(p, m.group(0)) for p in root.rglob("*.py")
             for m in re.finditer(r"torch\.load\([^)]*\)", p.read_text())]
    assert calls, "expected the covariance cache to call torch.load"
    assert [c for c in calls if "weights_only=True" not in c[1]] == []


# --- where ---------------------------------------------------------------------------------
def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("KVLAB_DATA", str(tmp_path / "data"))   # data only, not caches
    monkeypatch.setenv("KVLAB_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cov.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("KVLAB_CACHE")
    assert cov.cache_dir() == tmp_path / "xdg" / "kvlab"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cov.cache_dir() == tmp_path / "home" / ".cache" / "kvlab"
    source = Path(kvlab.__file__).resolve().parents[1]
    assert source not in cov.cache_dir().resolve().parents


def _request(model, tok):
    now = current_answer(model, tok, "anna berg lives in")
    return EditRequest("{} lives in", "anna berg", next(w for w in ("rome", "paris") if w != now))


@pytest.mark.parametrize("how", ["below a file", "permission denied", "read-only"])
def test_unwritable_cache_warns_once_and_edits_still_work(tmp_path, monkeypatch, how):
    if how == "permission denied":                  # what a read-only folder does for a non-root user
        folder = tmp_path / "denied"

        def denied(*a, **kw):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(tempfile, "mkstemp", denied)
        monkeypatch.setattr(Path, "mkdir", denied)
    elif how == "below a file":
        (tmp_path / "file").write_text("not a folder")
        folder = tmp_path / "file" / "cache"
    else:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o500)
        if os.access(folder, os.W_OK):
            pytest.skip("running as root: permissions are not enforced")
    monkeypatch.setenv("KVLAB_CACHE", str(folder))
    model, tok, arch = tiny("gpt2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        C = C_of(model, tok)
        C_of(model, tok, texts=OTHER)
        edit = apply_rome(model, tok, _request(model, tok), layer=1, templates=TEMPLATES, v_steps=3)
        edit.undo()
        apply_memit(model, tok, [_request(model, tok)], layers=[0, 1], templates=TEMPLATES, v_steps=3,
                    progress=False).undo()
    msgs = [str(w.message) for w in caught if "covariance cache" in str(w.message)]
    assert len(msgs) == 1 and "cannot write" in msgs[0], msgs
    torch.testing.assert_close(C, C_of(model, tok, cache=False))
    if how == "read-only":
        folder.chmod(0o700)


def test_left_padding_tokenizer_gives_the_same_C_and_is_restored():
    """key_covariance pads through the tokenizer: a caller's left padding must not change C, and stays set."""
    model, tok, arch = tiny("gpt2")
    texts = ["the king of france", "anna berg lives in paris", "tom"]
    right = cov.key_covariance(model, tok, 1, texts=texts, cache=False, progress=False)
    tok.padding_side = "left"
    left = cov.key_covariance(model, tok, 1, texts=texts, cache=False, progress=False)
    assert tok.padding_side == "left"
    assert torch.allclose(left, right, atol=1e-10)
