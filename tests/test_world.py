"""The built-in world: generator, tokenizer, shipped model, a tiny training run."""
import random

import pytest

from kvlab.world import MODEL_DIR, build_world, world_tokenizer
from kvlab.world.train import QUICK, TrainConfig, recall, train


@pytest.fixture(scope="module")
def world():
    return build_world(0)


@pytest.fixture(scope="module")
def tok():
    return world_tokenizer()


def test_deterministic(world):
    again = build_world(0)
    assert again.facts == world.facts and again.people == world.people
    assert build_world(1).facts != world.facts
    assert [s.text for s in world.corpus(n=50, seed=3)] == [s.text for s in again.corpus(n=50, seed=3)]


def test_world_shape(world):
    assert len(world.people) >= 200 and all(len(p.split()) == 2 for p in world.people)
    assert len(world.relations) >= 6
    for rel in world.relations.values():
        assert rel.train and rel.heldout and not set(rel.train) & set(rel.heldout)
        assert all("{}" in t for t in rel.train + rel.heldout)
        assert all(" " not in o for o in rel.objects)
    f = world.facts[0]
    assert world.object_of(f.subject, f.relation_id) == f.object
    prompt, subj, rid, obj = world.fact_prompts("heldout")[0]
    assert subj in prompt and obj == world.object_of(subj, rid)


def test_heldout_never_in_corpus(world):
    heldout = {(t.split("{}")[0], t.split("{}")[1]) for r in world.relations.values() for t in r.heldout}
    kinds = set()
    for s in world.corpus(n=5000, seed=0):
        kinds.add(s.kind)
        if s.kind == "fact":
            assert s.template in world.relations[s.relation_id].train
            pre, post = s.text.split(s.subject, 1)
            assert (pre, post.rsplit(" ", 1)[0]) not in heldout
    assert kinds == {"fact", "filler"}


def test_tokenizer_roundtrip_and_offsets(world, tok):
    for s in world.corpus(n=500, seed=1):
        ids = tok(s.text)["input_ids"]
        assert tok.unk_token_id not in ids and tok.decode(ids) == s.text
    for p, *_ in world.fact_prompts("heldout")[:200]:
        assert tok.decode(tok(p)["input_ids"]) == p and tok.unk_token_id not in tok(p)["input_ids"]
    enc = tok("Anna Berg lives in Kelmor.", return_offsets_mapping=True)
    assert tok.convert_ids_to_tokens(enc["input_ids"]) == ["▁Anna", "▁Berg", "▁lives", "▁in", "▁Kelmor", "."]
    assert [o[1] for o in enc["offset_mapping"]] == [4, 9, 15, 18, 25, 26]
    assert tok(" Kelmor")["input_ids"] == tok("Kelmor")["input_ids"]
    assert tok.eos_token == tok.bos_token == tok.pad_token == "<|endoftext|>"


def test_quick_training_loss_decreases(world, tok):
    cfg = TrainConfig(**QUICK)
    model, stats = train(world, tok, cfg, progress=False, log_every=0)
    losses = stats["losses"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert stats["tokens_per_s"] > 0


@pytest.mark.skipif(not (MODEL_DIR / "model.safetensors").exists(), reason="model not trained yet")
def test_shipped_model_recall(world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR).eval()
    assert model.config.model_type == "gpt2" and tok.eos_token_id is not None
    rng = random.Random(0)
    r_train = recall(model, tok, rng.sample(world.fact_prompts("train"), 200))["recall"]
    r_held = recall(model, tok, rng.sample(world.fact_prompts("heldout"), 200))["recall"]
    assert r_train >= 0.95, r_train
    assert r_held >= 0.6, r_held


def test_shipped_size():
    from kvlab.world import WORLD_DIR
    size = sum(p.stat().st_size for p in WORLD_DIR.rglob("*") if p.is_file())
    assert size <= 20 * 2**20


def test_profile_lines_list_every_attribute_of_the_person(world):
    profiles = [s for s in world.corpus(n=3000, seed=0, profiles=1) if s.kind == "profile"]
    assert profiles, "profiles=1 yields profile lines"
    for s in profiles[:50]:
        truth = sorted(f.object for f in world.facts if f.subject == s.subject)
        assert sorted(s.objects) == truth and len(truth) == 6
        assert s.text == f"{s.subject} {' '.join(s.objects)}."
    assert all(s.kind != "profile" for s in world.corpus(n=3000, seed=0))   # off by default


# ---------------------------------------------------------------------------------------------
# World 2 (an option; the shipped model is trained on world 1)

@pytest.fixture(scope="module")
def world2():
    return build_world(0, version=2)


def test_v2_is_the_default_and_versions_differ(world, world2):
    from kvlab.world.generator import VERSION
    world1 = build_world(0, version=1)
    assert VERSION == 2 and world.version == 2 and world1.version == 1
    assert world.facts == world2.facts and world1.facts != world2.facts
    with pytest.raises(ValueError, match="version"):
        build_world(0, version=3)


def test_shipped_model_is_trained_on_the_default_world():
    import json
    from kvlab.world.generator import VERSION
    from kvlab.world.train import TrainConfig
    stats = MODEL_DIR / "train_stats.json"
    if not stats.exists():
        pytest.skip(f"no shipped model at {MODEL_DIR}")
    config = json.loads(stats.read_text())["config"]
    assert config["world_version"] == VERSION
    # the defaults of `python -m kvlab.world train` reproduce the shipped model's settings
    assert {k: v for k, v in vars(TrainConfig()).items() if k != "threads"} == \
        {k: v for k, v in config.items() if k != "threads"}


def test_v2_last_names_identify_the_person(world2):
    lasts = [p.split()[1] for p in world2.people]
    assert len(set(lasts)) == len(lasts) == len(world2.people)
    assert len({p.split()[0] for p in world2.people}) < len(world2.people) / 4      # first names repeat
    v1_lasts = [p.split()[1] for p in build_world(0, version=1).people]
    assert len(set(v1_lasts)) < len(v1_lasts) / 4                                     # world 1 shares them


def test_v2_heldout_never_in_corpus_and_places_repeat(world2):
    heldout = {(t.split("{}")[0], t.split("{}")[1]) for r in world2.relations.values() for t in r.heldout}
    for rel in world2.relations.values():
        assert not set(rel.train) & set(rel.heldout)
    n_place = {1: 0, 10: 0}
    for rep in n_place:
        for s in world2.corpus(n=4000, seed=0, profiles=1, place_repeat=rep):
            if s.kind == "fact":
                pre, post = s.text.split(s.subject, 1)
                assert (pre, post.rsplit(" ", 1)[0]) not in heldout
                n_place[rep] += s.relation_id in ("P17", "P37")
    assert n_place[10] > 5 * max(1, n_place[1])


def test_v2_tokenizer_covers_the_world(world2):
    tok2 = world_tokenizer(2)
    for p, subj, *_ in world2.fact_prompts("heldout")[::50] + world2.fact_prompts("train")[::200]:
        ids = tok2(p)["input_ids"]
        assert tok2.unk_token_id not in ids and tok2.decode(ids) == p
        assert len(tok2(" " + subj, add_special_tokens=False)["input_ids"]) == len(subj.split())  # one per word


def test_mlp0_off_keeps_layer0_ffn_empty(world2):
    tok2 = world_tokenizer(2)
    cfg = TrainConfig(**QUICK, mlp0_off=True, world_version=2, place_repeat=10)
    model, stats = train(world2, tok2, cfg, progress=False, log_every=0)
    mlp = model.transformer.h[0].mlp
    assert mlp.c_proj.weight.abs().max() == 0 and mlp.c_proj.bias.abs().max() == 0
    assert model.transformer.h[1].mlp.c_proj.weight.abs().max() > 0
    assert all(p.requires_grad for p in model.parameters())
    assert sum(stats["losses"][-5:]) / 5 < sum(stats["losses"][:5]) / 5 - 0.5
