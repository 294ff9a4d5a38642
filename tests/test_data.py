"""Loaders for ROME-format files: good records load, malformed ones fail with a clear message."""
import copy
import json

import pytest

from kvlab.data import EditCase, KnownFact, load_counterfact, load_known

KNOWN = {"known_id": 0, "subject": "Vinson Massif", "attribute": "Antarctica",
         "template": "{} is located in the continent of", "prediction": " Antarctica",
         "prompt": "Vinson Massif is located in the continent of", "relation_id": "P30"}
CASE = {"case_id": 0, "pararel_idx": 2796,
        "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
                              "target_new": {"str": "English", "id": "Q1860"},
                              "target_true": {"str": "French", "id": "Q150"}, "subject": "Danielle Darrieux"},
        "paraphrase_prompts": ["Shayna does this and Yossel goes still and dies. Danielle Darrieux, a native"],
        "neighborhood_prompts": ["The mother tongue of L\u00e9on Blum is"],
        "attribute_prompts": ["J. R. R. Tolkien is a native speaker of"],
        "generation_prompts": ["Danielle Darrieux's mother tongue is"]}


def write(tmp_path, rows):
    p = tmp_path / "f.json"
    p.write_text(json.dumps(rows))
    return p


def test_known_good(tmp_path):
    (k,) = load_known(write(tmp_path, [KNOWN]))
    assert isinstance(k, KnownFact) and k.subject == "Vinson Massif" and k.template.format(k.subject) == k.prompt


def test_counterfact_good(tmp_path):
    (c,) = load_counterfact(write(tmp_path, [CASE]))
    assert isinstance(c, EditCase) and c.target_new.id == "Q1860" and c.target_true.str == "French"
    assert c.rewrite_prompt == "The mother tongue of Danielle Darrieux is"


def test_counterfact_int_ids_still_load(tmp_path):
    """The built-in world's file gives token ids (ints) where ROME's gives Wikidata ids."""
    rec = copy.deepcopy(CASE)
    rec["requested_rewrite"]["target_new"]["id"] = 3594
    (c,) = load_counterfact(write(tmp_path, [rec]))
    assert c.target_new.id == 3594 and c.target_true.id == "Q150"


@pytest.mark.parametrize("mutate, msg", [
    (lambda r: r.pop("subject"), "missing key 'subject'"),
    (lambda r: r.update(template="is located in"), "'template' has no '{}'"),
    (lambda r: r.update(attribute=""), "'attribute' is empty"),
    (lambda r: r.update(known_id="7"), "'known_id' has wrong type"),
])
def test_known_bad(tmp_path, mutate, msg):
    bad = copy.deepcopy(KNOWN)
    mutate(bad)
    with pytest.raises(ValueError, match="record 1") as e:
        load_known(write(tmp_path, [KNOWN, bad]))
    assert msg in str(e.value)


@pytest.mark.parametrize("mutate, msg", [
    (lambda r: r.pop("paraphrase_prompts"), "missing key 'paraphrase_prompts'"),
    (lambda r: r["requested_rewrite"].update(prompt="The mother tongue of X is"), "'prompt' has no '{}'"),
    (lambda r: r["requested_rewrite"]["target_new"].update(str=""), "'str' is empty"),
    (lambda r: r["requested_rewrite"]["target_true"].update(id=4.5), "'id' has wrong type"),
    (lambda r: r["requested_rewrite"]["target_true"].update(id=""), "'id' is empty"),
    (lambda r: r["requested_rewrite"].pop("target_new"), "missing key 'target_new'"),
    (lambda r: r.update(neighborhood_prompts="x"), "'neighborhood_prompts' has wrong type"),
])
def test_counterfact_bad(tmp_path, mutate, msg):
    bad = copy.deepcopy(CASE)
    bad["case_id"] = 42
    mutate(bad)
    with pytest.raises(ValueError, match="case_id=42") as e:
        load_counterfact(write(tmp_path, [CASE, bad]))
    assert msg in str(e.value)


def test_not_a_list(tmp_path):
    with pytest.raises(ValueError, match="list"):
        load_known(write(tmp_path, {"a": 1}))


def _serve(tmp_path, monkeypatch, known=(KNOWN,), cases=(CASE,)):
    """ROME's data site as a local folder (file:// URLs), and an empty cache."""
    from kvlab import data
    site = tmp_path / "site"
    site.mkdir()
    (site / "known_1000.json").write_text(json.dumps(list(known)))
    (site / "counterfact.json").write_text(json.dumps(list(cases)))
    monkeypatch.setattr(data, "ROME_DATA", site.as_uri() + "/")
    monkeypatch.setenv("KVLAB_CACHE", str(tmp_path / "cache"))
    return site


def test_fetch_downloads_once_into_the_cache(tmp_path, monkeypatch):
    from kvlab import data
    site = _serve(tmp_path, monkeypatch)
    (k,) = data.fetch_known()
    assert k.subject == "Vinson Massif"
    assert data.fetch("known") == tmp_path / "cache" / "rome" / "known_1000.json"
    (site / "known_1000.json").unlink()              # served once, then read from the cache
    assert data.fetch_known()[0].subject == "Vinson Massif"
    assert data.fetch_counterfact()[0].target_new.id == "Q1860"


def test_fetch_offline_says_what_to_do(tmp_path, monkeypatch):
    from kvlab import data
    monkeypatch.setattr(data, "ROME_DATA", (tmp_path / "nowhere").as_uri() + "/")
    monkeypatch.setenv("KVLAB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(OSError, match="may be offline.*pass its path"):
        data.fetch_known()
    assert not list((tmp_path / "cache").rglob("*.json"))   # nothing half-written
    with pytest.raises(ValueError, match="unknown ROME data set"):
        data.fetch("zsre")


def test_sources_auto_world_rome_path_url(tmp_path, monkeypatch):
    import kvlab
    from kvlab.testing import tiny
    _serve(tmp_path, monkeypatch)
    builtin = kvlab.load().model
    hub_like = tiny("gpt2").model
    world = load_known("world")
    assert len(world) > 1000 and load_known("auto", model=builtin) == world == load_known()
    assert load_known("auto", model=hub_like)[0].subject == "Vinson Massif"    # ROME's data on other models
    assert load_known("rome")[0].subject == "Vinson Massif"
    path = write(tmp_path, [KNOWN])
    assert load_known(str(path))[0].prompt == KNOWN["prompt"] and load_known(path.as_uri())[0].known_id == 0
    with pytest.raises(ValueError, match="needs the model"):
        load_known("auto")
    with pytest.raises(FileNotFoundError, match="not found; a source is one of"):
        load_counterfact("wrold")


def test_real_known_1000_records_load_unchanged():
    """Twelve records of ROME's own known_1000.json, as published (tests/data/README.md)."""
    from dataclasses import asdict
    from pathlib import Path
    path = Path(__file__).parent / "data" / "known_1000_head.json"
    raw = json.loads(path.read_text())
    facts = load_known(path)
    assert [asdict(f) for f in facts] == raw
    assert all(f.subject in f.prompt for f in facts)
    assert facts[0].prompt != facts[0].template.format(facts[0].subject)   # the real file's quirk, kept


@pytest.mark.parametrize("mutate, msg", [
    (lambda r: r["requested_rewrite"].update(prompt="{} and {} speak"), "has 2 '{}', needs exactly one"),
    (lambda r: r["requested_rewrite"].update(prompt="{} plays {sport}"), "braces besides the one '{}'"),
    (lambda r: r["requested_rewrite"].update(prompt="{} is {0}"), "braces besides the one '{}'"),
    (lambda r: r.update(case_id=0), "duplicate case_id 0 (record 0 has it too)"),
])
def test_counterfact_records_that_would_fail_later(tmp_path, mutate, msg):
    """A rewrite prompt that str.format cannot fill with the subject alone (IndexError/KeyError in rewrite_prompt)
    and a duplicate id are refused at load time, naming the file, the record and the problem."""
    bad = copy.deepcopy(CASE)
    bad["case_id"] = 42
    mutate(bad)
    path = write(tmp_path, [CASE, bad])
    with pytest.raises(ValueError, match="counterfact record 1") as e:
        load_counterfact(path)
    assert msg in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize("mutate, msg", [
    (lambda r: r.update(prompt="Mount Vinson is located in the continent of"),
     "does not contain the subject 'Vinson Massif'"),
    (lambda r: r.update(template="{} is in {}"), "has 2 '{}'"),
    (lambda r: r.update(known_id=0), "duplicate known_id 0 (record 0 has it too)"),
])
def test_known_records_that_would_fail_later(tmp_path, mutate, msg):
    bad = copy.deepcopy(KNOWN)
    bad["known_id"] = 7
    mutate(bad)
    path = write(tmp_path, [KNOWN, bad])
    with pytest.raises(ValueError, match="known fact record 1") as e:
        load_known(path)
    assert msg in str(e.value) and str(path) in str(e.value)


def test_unreadable_files_are_named(tmp_path):
    """Malformed JSON, a file that is not UTF-8, an HTML page or JSON nested too deeply: a ValueError naming the
    file (not a bare JSONDecodeError / UnicodeDecodeError / RecursionError); a byte-order mark is accepted."""
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps([KNOWN]).encode())
    assert load_known(bom)[0].subject == "Vinson Massif"
    cases = {"broken.json": (json.dumps([KNOWN])[:-5].encode(), r"not valid JSON: .* at line 1, column"),
             "latin1.json": (json.dumps([{**KNOWN, "attribute": "Antártida"}], ensure_ascii=False).encode("latin-1"),
                             r"not UTF-8 text \(byte \d+ is b'\\xe1'\)"),
             "page.json": (b"<!DOCTYPE html><html><body>502 Bad Gateway</body></html>", "HTML page"),
             "deep.json": (b"[" * 200_000 + b"]" * 200_000, "nested too deeply")}
    for name, (data, msg) in cases.items():
        (tmp_path / name).write_bytes(data)
        for load in (load_known, load_counterfact):
            with pytest.raises(ValueError, match=msg) as e:
                load(tmp_path / name)
            assert str(e.value).startswith(str(tmp_path / name)), str(e.value)


def test_corpus_jsonl_errors_name_the_file_and_line(tmp_path):
    from kvlab.data import load_corpus
    good = tmp_path / "texts.jsonl"
    good.write_bytes(b"\xef\xbb\xbf" + b'{"text": "one"}\n"two"\n')
    assert load_corpus(good) == ["one", "two"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "one"}\n{"text": "two"\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2: not valid JSON"):
        load_corpus(bad)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("Antártida\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.txt: not UTF-8 text"):
        load_corpus(latin)


def test_layer_stats_that_are_not_stats_files(tmp_path, monkeypatch):
    """An HTML error page saved as the .npz is named as such (not numpy's advice to set allow_pickle), also
    when it is what a download returned; non-finite numbers are refused."""
    import numpy as np
    from kvlab import data
    page = tmp_path / "page.npz"
    page.write_text("<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head></html>")
    with pytest.raises(ValueError, match=r"page\.npz: not a stats file .*HTML page") as e:
        data.load_layer_stats(page)
    assert "allow_pickle" not in str(e.value)
    monkeypatch.setenv("KVLAB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(OSError, match="HTML page") as e:
        data.fetch_layer_stats("gpt2", "transformer.h.0.mlp.c_proj", url=page.as_uri())
    assert "allow_pickle" not in str(e.value) and not list((tmp_path / "cache").rglob("*.npz"))
    truncated = tmp_path / "partial.npz"
    np.savez(truncated, **{"mom2.mom2": np.eye(4, dtype=np.float32), "mom2.count": np.array(10)})
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(ValueError, match=r"partial\.npz: not a readable stats file"):
        data.load_layer_stats(truncated)
    nan = tmp_path / "nan.npz"
    m = np.eye(4, dtype=np.float32)
    m[1, 2] = np.nan
    np.savez(nan, **{"mom2.mom2": m, "mom2.count": np.array(10)})
    with pytest.raises(ValueError, match=r"nan\.npz: .*1 non-finite entries"):
        data.load_layer_stats(nan)
