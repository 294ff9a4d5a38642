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
    C, key = C_of(model, tok, cache=False), cov.cache_key(model, tok, 1, TEXTS, None)
    with torch.no_grad():
        for p in arch.attn(1).parameters():
            p.mul_(1.7)
    assert cov.cache_key(model, tok, 1, TEXTS, None) == key
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
    key = cov.cache_key(model, tok, 1, TEXTS, None)
    assert cov.cache_key(model, tok, 1, TEXTS[:-1], None) != key
    assert cov.cache_key(model, tok, 1, OTHER, None) != key
    assert cov.cache_key(model, tok, 1, TEXTS, 5) != key
    assert cov.cache_key(model, tok, 2, TEXTS, None) != key
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
    fa, fb = (fresh_cache / f"{cov.cache_key(model, tok, 1, t, None)}.pt" for t in (TEXTS, OTHER))
    os.utime(fa, (100, 100))
    os.utime(fb, (200, 200))                        # B used more recently than A ...
    cov._MEMORY.clear()
    torch.testing.assert_close(C_of(model, tok, texts=TEXTS), A)  # ... until A is read again
    C_of(model, tok, texts=TEXTS[:20])
    assert fa.exists() and not fb.exists() and len(files(fresh_cache)) == 2
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
    torch.testing.assert_close(torch.load(path, weights_only=True)["C"], C)  # rewritten
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


# --- state a key cannot see: hooks, a replaced forward, training mode -----------------------
def _state(kind, model, arch, stack):
    """Enter one state that changes (or may change) C without changing a weight."""
    if kind == "kvlab suppress":
        stack.enter_context(kvlab.neurons.suppress(model, [(0, i) for i in range(40)], positions="all"))
    elif kind == "someone's pre-hook":
        h = arch.value_module(0).register_forward_pre_hook(lambda m, a: (a[0] * 2,))
        stack.callback(h.remove)
    elif kind == "someone's forward hook":
        h = arch.mlp(0).register_forward_hook(lambda m, a, out: out * 3)
        stack.callback(h.remove)
    elif kind == "global hook":
        h = torch.nn.modules.module.register_module_forward_hook(
            lambda m, a, out: out * 1.5 if m is arch.mlp(0) else None)
        stack.callback(h.remove)
    elif kind == "replaced forward":
        mlp = arch.mlp(0)
        forward = mlp.forward
        mlp.forward = lambda x, *a, **kw: forward(x, *a, **kw) * 2
        stack.callback(lambda: delattr(mlp, "forward"))
    else:                                            # training mode: dropout would make C random
        model.train()
        stack.callback(model.eval)


STATES = ["kvlab suppress", "someone's pre-hook", "someone's forward hook", "global hook", "replaced forward",
          "training mode"]


@pytest.mark.parametrize("kind", STATES)
def test_hooked_or_training_model_bypasses_both_caches(fresh_cache, kind):
    """A C computed while a hook is active is the hooked model's: it must neither be served to nor from the
    plain model's key (it was: every later ROME/MEMIT edit at that layer used it)."""
    from contextlib import ExitStack
    model, tok, arch = tiny("gpt2")
    true = C_of(model, tok, cache=False)
    with ExitStack() as stack:
        _state(kind, model, arch, stack)
        expect = C_of(model, tok, cache=False)          # what the model computes in that state
        with pytest.warns(RuntimeWarning, match="without the covariance cache"):
            got = C_of(model, tok)
        with pytest.warns(RuntimeWarning, match="without the covariance cache"):
            C_of(model, tok)
    torch.testing.assert_close(got, expect, rtol=0, atol=0)
    assert files(fresh_cache) == [] and len(cov._MEMORY) == 0   # nothing written
    if kind != "training mode":                          # the tiny model has no dropout
        assert not torch.allclose(got, true)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(C_of(model, tok), true, rtol=0, atol=0)
    assert len(files(fresh_cache)) == 1
    with ExitStack() as stack:                           # and the plain model's cached C is not served
        _state(kind, model, arch, stack)
        with pytest.warns(RuntimeWarning, match="without the covariance cache"):
            torch.testing.assert_close(C_of(model, tok), expect, rtol=0, atol=0)
    assert model.training is False and arch.mlp(0)._forward_hooks == {} and "forward" not in vars(arch.mlp(0))


def test_builtin_model_suppressed_neurons_do_not_poison_the_cache(fresh_cache):
    """The reported case: C at layer 2 computed under kvlab.neurons.suppress was served afterwards."""
    model, tok, arch = kvlab.load(device="cpu")
    texts = kvlab.world.corpus_texts(n=60, seed=3)
    with kvlab.neurons.suppress(model, [(1, i) for i in range(100)], positions="all"):
        with pytest.warns(RuntimeWarning, match="forward hooks are registered on"):
            C_of(model, tok, 2, texts)
    torch.testing.assert_close(C_of(model, tok, 2, texts), C_of(model, tok, 2, texts, cache=False),
                               rtol=0, atol=0)


@pytest.mark.parametrize("change", ["activation", "norm eps"])
def test_module_settings_without_parameters_are_in_the_key(change):
    """Swapping the activation or a norm's eps changes C but no parameter or buffer."""
    model, tok, arch = tiny("gpt2")
    C = C_of(model, tok)
    if change == "activation":
        setattr(arch.mlp(1), arch.family.act.split(".")[-1], torch.nn.ReLU().eval())
    else:
        arch.mlp_norm(1).eps = 0.5
    assert not torch.allclose(C_of(model, tok, cache=False), C)
    assert_fresh(model, tok)


def test_autocast_is_in_the_key():
    model, tok, arch = tiny("gpt2")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = C_of(model, tok)
    assert not torch.allclose(low, C_of(model, tok, cache=False))
    assert_fresh(model, tok)


def test_key_sees_texts_past_the_probe_and_the_truncation_side():
    model, tok, arch = tiny("gpt2")
    head = [TEXTS[0]] * 16                           # the tokenizer probe reads only the first 16 texts
    a, b = WORDS[:2]
    assert (cov.cache_key(model, tok, 1, head + [a + "\x00", b], None)
            != cov.cache_key(model, tok, 1, head + [a, "\x00" + b], None))
    texts = head + [" ".join(WORDS[:12])]
    C = C_of(model, tok, texts=texts, max_length=5)
    tok.truncation_side = "left"
    try:
        assert not torch.allclose(C_of(model, tok, texts=texts, max_length=5, cache=False), C)
        torch.testing.assert_close(C_of(model, tok, texts=texts, max_length=5),
                                   C_of(model, tok, texts=texts, max_length=5, cache=False))
    finally:
        tok.truncation_side = "right"


def test_C_changed_in_place_after_it_was_returned_is_not_served():
    model, tok, _ = tiny("gpt2")
    C = C_of(model, tok)
    true = C.clone()
    C.add_(1.0)                                      # the caller changes the tensor the memory cache holds
    with pytest.warns(RuntimeWarning, match="changed in place"):
        torch.testing.assert_close(C_of(model, tok), true, rtol=0, atol=0)


# --- integrity of the files --------------------------------------------------------------------
@pytest.mark.parametrize("tamper", ["one entry changed", "another key's file", "a bare matrix"])
def test_tampered_file_is_detected_removed_and_recomputed(fresh_cache, tamper):
    import numpy as np
    model, tok, arch = tiny("gpt2")
    C = C_of(model, tok)
    (path,) = files(fresh_cache)
    if tamper == "one entry changed":               # the bits of one entry, in place: still a valid zip
        raw, old = path.read_bytes(), C[5, 5].numpy().tobytes()   # C is symmetric: a diagonal entry
        assert raw.count(old) == 1
        path.write_bytes(raw.replace(old, np.float64(154_064.0).tobytes()))
    elif tamper == "another key's file":            # a well-formed file with a right-shaped, wrong C
        C_of(model, tok, texts=OTHER)
        (other,) = [p for p in files(fresh_cache) if p != path]
        path.write_bytes(other.read_bytes())
    else:
        torch.save(C * 2, path)
    cov._MEMORY.clear()
    with pytest.warns(RuntimeWarning, match=f"removing the covariance cache {re.escape(str(path))}"):
        torch.testing.assert_close(C_of(model, tok), C, rtol=0, atol=0)
    cov._MEMORY.clear()                             # rewritten, and sound
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(C_of(model, tok), C, rtol=0, atol=0)


# --- max_length and the model's positions ---------------------------------------------------------
def test_long_texts_are_cut_to_the_models_positions():
    """The default max_length was 128, beyond the 64 positions of the built-in and tiny models: a text of
    65-128 tokens raised a bare IndexError from the position embedding."""
    model, tok, arch = tiny("gpt2", positions=64)
    long = " ".join(_rng.choice(WORDS) for _ in range(100))
    ids = tok(long)["input_ids"]
    assert len(ids) > 64
    C = C_of(model, tok, texts=[long], cache=False)
    torch.testing.assert_close(C, C_of(model, tok, texts=[tok.decode(ids[:64])], cache=False))
    assert torch.equal(C_of(model, tok, texts=[long]), C_of(model, tok, texts=[long], max_length=64))
    with pytest.raises(ValueError, match=r"max_length=128 exceeds the model's 64 positions \(config.n_positions\)"):
        C_of(model, tok, texts=[long], max_length=128)


def test_builtin_model_takes_a_long_corpus_text():
    model, tok, arch = kvlab.load(device="cpu")
    text = " ".join(kvlab.world.corpus_texts(n=20, seed=1))
    assert 64 < len(tok(text)["input_ids"]) <= 300
    C = C_of(model, tok, 2, [text], cache=False)
    assert C.shape == (arch.d_ff, arch.d_ff) and torch.isfinite(C).all()


@pytest.mark.parametrize("arg, value, match", [
    ("max_length", 0, "max_length must be a positive int"),
    ("max_length", 2.5, "max_length must be a positive int"),
    ("batch_size", 0, "batch_size must be a positive int"),
    ("batch_size", -1, "batch_size must be a positive int"),
    ("n", 0, "n must be a positive int"),
    ("n", True, "n must be a positive int"),
    ("texts", "anna berg lives in paris", "texts must be a list of strings, got one str"),
    ("texts", ["anna berg", 3, "tom"], r"texts\[1\] is a int"),
])
def test_bad_arguments_raise_before_the_model_runs(arg, value, match, fresh_cache):
    model, tok, _ = tiny("gpt2")
    kw = {"texts": TEXTS, arg: value}
    with pytest.raises(ValueError, match=match):
        key_covariance(model, tok, 1, progress=False, **kw)
    assert files(fresh_cache) == [] and len(cov._MEMORY) == 0


# --- the settings -----------------------------------------------------------------------------
def test_cache_max_mb_0_disables_the_disk_cache_without_deleting_files(fresh_cache, monkeypatch):
    model, tok, _ = tiny("gpt2")
    C_of(model, tok, texts=TEXTS)
    C_of(model, tok, texts=OTHER)
    before = {p: p.read_bytes() for p in files(fresh_cache)}
    for p in before:
        os.utime(p, (100, 100))
    cov._MEMORY.clear()
    monkeypatch.setenv("KVLAB_CACHE_MAX_MB", "0")   # the docs: 0 disables the disk cache
    C_of(model, tok, texts=TEXTS)                   # not read from disk ...
    C_of(model, tok, texts=TEXTS[:20])              # ... nor written
    cov.evict()
    assert {p: p.read_bytes() for p in files(fresh_cache)} == before
    assert all(p.stat().st_mtime == 100 for p in before)


@pytest.mark.parametrize("name", ["KVLAB_CACHE_MAX_MB", "KVLAB_CACHE_MEMORY_MB"])
@pytest.mark.parametrize("raw", ["lots", "nan", "-1", "1e3MB"])
def test_bad_cache_setting_raises_naming_it_before_any_work(name, raw, monkeypatch):
    model, tok, _ = tiny("gpt2")
    C_of(model, tok)                                # in memory now: the setting is read all the same
    monkeypatch.setenv(name, raw)
    calls = []
    monkeypatch.setattr(type(model), "forward", lambda *a, **kw: calls.append(1))
    for texts in (TEXTS, OTHER):
        with pytest.raises(ValueError, match=rf"{name} must be .*{re.escape(repr(raw))}"):
            C_of(model, tok, texts=texts)
    assert calls == []


# --- never a NaN C --------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["embedding", "key of a lower layer"])
def test_non_finite_weight_upstream_raises_naming_it(fresh_cache, where):
    model, tok, arch = tiny("gpt2")
    name = "transformer.wte.weight" if where == "embedding" else "transformer.h.0.mlp.c_fc.weight"
    with torch.no_grad():
        model.get_parameter(name)[3, 2] = float("nan") if where == "embedding" else float("inf")
    with pytest.raises(ValueError, match=rf"parameter {re.escape(name)} has NaN or inf entries"):
        C_of(model, tok)
    assert files(fresh_cache) == [] and len(cov._MEMORY) == 0


def test_overflowing_keys_raise_naming_the_layer_and_text(fresh_cache):
    model, tok, arch = tiny("gpt2")
    with torch.no_grad():
        arch.key_matrix(1).mul_(1e38)                # finite weights, infinite activations
    with pytest.raises(ValueError, match=r"keys of layer 1 are NaN or inf for text 0"):
        C_of(model, tok)
    assert files(fresh_cache) == [] and len(cov._MEMORY) == 0


def test_non_finite_stats_raise():
    model, tok, arch = tiny("gpt2")
    S = torch.eye(arch.d_ff, dtype=torch.float64)
    S[1, 1] = float("nan")
    with pytest.raises(ValueError, match="stats for layer 1 have NaN or inf"):
        key_covariance(model, tok, 1, stats=S)


@pytest.mark.parametrize("family", kvlab.testing.FAMILIES)
def test_key_is_stable_across_forward_passes(family, fresh_cache):
    """Module settings are in the key: none of them may change by running the model (lazy caches would
    give a new key, and a new file, on every call)."""
    model, tok, arch = tiny(family)
    key = cov.cache_key(model, tok, 1, TEXTS, None)
    with torch.no_grad():
        model(input_ids=torch.randint(1, 50, (2, 60)))
    C = C_of(model, tok)
    assert cov.cache_key(model, tok, 1, TEXTS, None) == key
    assert C_of(model, tok) is C and [p.stem for p in files(fresh_cache)] == [key]
