"""kvlab.data.load_corpus (CORPUS parameter) and ROME's published layer statistics."""
import sys

import numpy as np
import pytest
import torch

import kvlab
from kvlab.data import fetch_layer_stats, layer_stats_name, load_corpus, load_layer_stats
from kvlab.editing.covariance import key_covariance


def test_world_and_files(tmp_path):
    world = load_corpus("world", n=5)
    assert len(world) == 5 and all(isinstance(t, str) and t for t in world)
    txt = tmp_path / "c.txt"
    txt.write_text("first text\n\n  second text  \nthird\n", encoding="utf-8")
    assert load_corpus(txt, n=2) == ["first text", "second text"]
    jl = tmp_path / "c.jsonl"
    jl.write_text('{"text": "a b"}\n"c d"\n', encoding="utf-8")
    assert load_corpus(str(jl)) == ["a b", "c d"]
    jl.write_text('{"title": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 1 is neither a string nor an object with a 'text'"):
        load_corpus(jl)


def test_auto_and_errors(tmp_path, monkeypatch):
    model, tok, _ = kvlab.load()
    assert load_corpus("auto", model=model, n=3) == load_corpus("world", n=3)
    with pytest.raises(ValueError, match="needs the model"):
        load_corpus("auto")
    with pytest.raises(FileNotFoundError, match="corpus 'nope.txt' not found"):
        load_corpus("nope.txt")
    with pytest.raises(ValueError, match="n must be a positive int"):
        load_corpus("world", n=0)
    monkeypatch.setitem(sys.modules, "datasets", None)          # `datasets` not installed
    with pytest.raises(OSError, match=r"optional package `datasets`.*CORPUS='/path/texts.txt'"):
        load_corpus("wikitext", n=3)


def _rome_npz(path, keys):
    """A file in the schema of ROME's layer_stats (util.runningstats.CombinedStat(mom2=SecondMoment()))."""
    count = keys.shape[0]
    np.savez(path, **{"mom2.constructor": np.array("util.runningstats.SecondMoment()"),
                      "mom2.count": np.array(count), "mom2.mom2": (keys.T @ keys).astype(np.float32),
                      "sample_size": np.array(100000)})


def test_layer_stats_in_kvlab_convention(tmp_path, monkeypatch):
    assert layer_stats_name("gpt2-xl", "transformer.h.17.mlp.c_proj") == \
        "gpt2-xl/wikipedia_stats/transformer.h.17.mlp.c_proj_float32_mom2_100000.npz"
    assert layer_stats_name("EleutherAI/gpt-j-6B", "transformer.h.5.mlp.fc_out").startswith("EleutherAI_gpt-j-6B/")
    model, tok, arch = kvlab.load()
    keys = np.random.default_rng(0).normal(size=(500, arch.d_ff))
    f = tmp_path / "s.npz"
    _rome_npz(f, keys)
    C = load_layer_stats(f)
    assert C.dtype == torch.float64 and C.shape == (arch.d_ff, arch.d_ff)
    assert torch.allclose(C, torch.from_numpy(keys.T @ keys / 500), rtol=1e-5, atol=1e-6)   # E[k kᵀ], not the sum
    assert torch.equal(key_covariance(model, tok, 2, stats=f), C)

    # fetched once into the cache (here from a file:// URL standing in for rome.baulab.info)
    name = layer_stats_name("gpt2-xl", "transformer.h.17.mlp.c_proj")
    got = fetch_layer_stats("gpt2-xl", "transformer.h.17.mlp.c_proj", url=f.as_uri())
    assert torch.equal(got, C) and (kvlab.env.cache_dir() / "rome" / "stats" / name).exists()

    small = tmp_path / "small.npz"
    _rome_npz(small, keys[:, :8])
    with pytest.raises(ValueError, match="do not fit layer 2, whose keys have d_ff="):
        key_covariance(model, tok, 2, stats=small)
    bad = tmp_path / "bad.npz"
    np.savez(bad, mean=np.zeros(3))
    with pytest.raises(ValueError, match="not a ROME second-moment file"):
        load_layer_stats(bad)
    with pytest.raises(OSError, match="pass its path to kvlab.data.load_layer_stats"):
        fetch_layer_stats("gpt2", "transformer.h.0.mlp.c_proj", url=(tmp_path / "missing.npz").as_uri())
