"""A seeded fictional world: people, places and the facts that tie them together.

    world = build_world(seed=0)
    world.facts[0]                      # Fact(subject='Anna Berg', relation_id='P19', object='Kelmor')
    world.relations["P551"].train       # ['{} lives in', ...]   (the object follows the template)
    world.relations["P551"].heldout     # phrasings that never appear in training
    for s in world.corpus(n=10, seed=1):  # Sentence(text, kind='fact'|'profile'|'filler', ...)
        print(s.text)

Every answer (object) is a single word, so it is a single token of the word-level
tokenizer and "did the model recall the fact" is one greedy next-token check.
People have two-word names (first + last), so the first and the last subject token differ.

Two versions of the world (``build_world(seed, version=...)``); the shipped model is trained on 2
(:data:`VERSION`, the default), version 1 is the first shipped model's (``train --world 1``):

- **1**: names drawn from 40 first x 40 last names, so a last name is shared by ~6 people and
  neither name token alone says who is meant;
- **2**: first names are shared, last names are unique (one per person, from :data:`LAST_NAMES_V2`):
  as with "... Obama" in real text, the last subject token identifies the person, so the lookup
  can happen there (ROME's edit site). Held-out phrasings are rebuilt so that each is a trained
  phrasing of the same relation with one familiar word added or swapped (:data:`RELATIONS_V2`), and
  city/country facts, 32 among 1,500 person facts, are repeated (``corpus(place_repeat=...)``).

Besides one-fact sentences the corpus holds *profile lines*: a person's name followed directly by
all their attributes in random order ("Anna Berg tennis Kelmor baker Zentrix violin Tirsa.").
Right after the name the model must already say something about the person, so it has to
recall the person at the last token of the name, the way real text makes GPT-2 build a
subject representation there (the site ROME edits). Without them the small model looks the
facts up at the final prompt token only and ROME's edit site carries nothing (notebook 07).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Iterator

# ---------------------------------------------------------------------------------------------
# Inventories (fixed; the seed decides who gets what)

FIRST_NAMES = ("Anna Boris Clara Dmitri Elena Felix Greta Hugo Ida Jonas Karin Lars Maja Nils Olga Pavel "
               "Rosa Sven Tilda Uwe Vera Wim Xenia Yusuf Zora Aron Britt Carl Dora Emil Frida Gustav "
               "Hanna Igor Jana Kurt Lena Milo Nora Oskar").split()
_REAL_LAST = ("Berg Holm Lind Falk Strand Novak Moreau Keller Brandt Vogel Richter Sandoval Okafor Tanaka "
              "Kowalski Petrov Larsen Dubois Rossi Varga Horvat Nyberg Ekman Quist Rahman Silva Costa "
              "Ferreira Weber Hoffman Jansen Bakker Meyer Lund Dahl Sato Ivanov Popescu Marin Szabo").split()


def _made_up_last_names(n: int) -> list[str]:
    """``n`` pronounceable two-syllable surnames ("Dalvik", "Morsten"...), fixed (no seed)."""
    onsets, vowels, mids = "B D F G H K L M N P R S T V W Z".split(), "a e i o u".split(), \
        "lv rk nd st mb rt lm ns rv lk".split()
    ends = "in er ak ov en ik as et".split()
    cands = [o + v + m + e for o in onsets for v in vowels for m in mids for e in ends]
    random.Random("last-names").shuffle(cands)
    return cands[:n]


LAST_NAMES = _REAL_LAST                                   # world 1: shared by several people
LAST_NAMES_V2 = _REAL_LAST + _made_up_last_names(360)     # world 2: 400 surnames, one per person
CITIES = ("Varnholm Kelmor Dunvale Tirsa Ombrey Caldris Fennick Lorvik Maradon Quillon Sarnia Brisk "
          "Telmarch Wexby Yarrow Zelphis Astrel Boskar Corvin Drenna Elsmoor Farrow Gildan Hestor").split()
COUNTRIES = "Norvania Calderra Ostmark Brevonia Solmira Kareth Lunaria Dravia".split()
LANGUAGES = "Elvic Taurish Mirren Oskan Belish Quarn Sollic Dremish".split()
OCCUPATIONS = ("baker pilot teacher nurse lawyer chef farmer architect dentist painter engineer "
               "journalist librarian plumber surgeon sailor").split()
EMPLOYERS = ("Zentrix Orbicom Halvex Nordata Quantel Veltron Kryos Lumina Arcadia Fernhill Stratos Pyxis "
             "Tessera Vantor Ironleaf Solace").split()
SPORTS = "tennis football hockey cricket rugby golf volleyball baseball basketball handball badminton polo".split()
INSTRUMENTS = "violin piano guitar cello flute trumpet drums harp clarinet saxophone oboe accordion".split()


@dataclass(frozen=True)
class Relation:
    """A relation: its id, a readable name, subject kind, answer set and phrasings.

    Templates contain "{}" for the subject and end right before the object
    (``"{} lives in".format("Anna Berg") + " " + "Kelmor"``). ``heldout`` templates never
    appear in the training corpus; they test whether recall survives a paraphrase.
    """

    id: str
    name: str
    subject_kind: str            # "person", "city" or "country"
    objects: tuple[str, ...]
    train: tuple[str, ...]
    heldout: tuple[str, ...]


# Held-out phrasings are new compositions of familiar parts: an adverb seen with other
# relations ("currently", "still", "also"), or a sentence frame ("the city where {} ... is",
# "the favorite ... of {} is") trained with a different relation.
RELATIONS: dict[str, Relation] = {r.id: r for r in [
    Relation("P19", "place of birth", "person", tuple(CITIES),
             train=("{} was born in", "{} was born in the city of", "the birthplace of {} is",
                    "{} is originally from", "the place where {} was born is", "the birthplace of {} is the city of"),
             heldout=("the city where {} was born is", "{} is also originally from")),
    Relation("P551", "residence", "person", tuple(CITIES),
             train=("{} lives in", "{} now lives in", "the home of {} is in", "the city where {} lives is",
                    "{} lives in the city of", "{} also lives in"),
             heldout=("{} currently lives in", "the place where {} lives is")),
    Relation("P106", "occupation", "person", tuple(OCCUPATIONS),
             train=("{} works as a", "{} is employed as a", "the job of {} is", "by profession, {} is a",
                    "{} currently works as a", "the job that {} has is"),
             heldout=("{} still works as a", "the profession of {} is")),
    Relation("P108", "employer", "person", tuple(EMPLOYERS),
             train=("{} works for", "{} is employed by", "the employer of {} is",
                    "the company that {} works for is", "{} still works for", "{} currently works for"),
             heldout=("{} now works for", "the company where {} works is")),
    Relation("P641", "sport", "person", tuple(SPORTS),
             train=("{} plays the sport of", "{} is a professional player of", "the favorite sport of {} is",
                    "the sport that {} plays is", "{} also plays the sport of", "{} currently plays"),
             heldout=("{} still plays the sport of", "the sport of {} is")),
    Relation("P1303", "instrument", "person", tuple(INSTRUMENTS),
             train=("{} plays the", "{} is a musician who plays the", "the instrument of {} is the",
                    "the instrument that {} plays is the", "{} now plays the", "{} still plays the"),
             heldout=("{} currently plays the", "the favorite instrument of {} is the")),
    Relation("P17", "country", "city", tuple(COUNTRIES),
             train=("{} is a city in", "{} is located in the country of", "the country of {} is",
                    "{} lies in", "the city of {} is in"),
             heldout=("the city of {} is located in", "{} is a city located in")),
    Relation("P37", "official language", "country", tuple(LANGUAGES),
             train=("the official language of {} is", "people in {} speak", "in {}, people speak",
                    "the language of {} is", "most people in {} speak"),
             heldout=("the main language of {} is", "in {}, most people speak")),
]}


# World 2. Held-out phrasings are new compositions of familiar parts: an adverb seen with other
# relations ("currently", "still", "also", "now") inserted into a phrasing of the relation, or a
# sentence frame ("the city where {} ... is", "the favorite ... of {} is") trained with a relation
# of the same subject and object kind. No held-out phrasing needs a word the relation's subject kind
# never occurs with (world v1's "the profession of {} is" and city -> country held-outs did, and
# scored 50% and 0%).
RELATIONS_V2: dict[str, Relation] = {rid: replace(r, **{
    "P106": dict(heldout=("{} now works as a", "{} is also employed as a")),
    "P108": dict(heldout=("{} also works for", "{} is now employed by")),
    "P17": dict(train=("{} is a city in", "{} is located in", "the country of {} is", "{} lies in",
                       "the city of {} is in", "{} is a city located in the country of"),
                heldout=("{} is also a city in", "the city of {} is located in")),
    "P37": dict(heldout=("in {}, most people speak", "people in {} also speak")),
}.get(rid, {})) for rid, r in RELATIONS.items()}


@dataclass(frozen=True)
class Fact:
    """One ground-truth triple: ``subject`` --relation_id--> ``object``."""

    subject: str
    relation_id: str
    object: str


@dataclass(frozen=True)
class Sentence:
    """A corpus sentence and what it is about (``kind`` "fact", "profile" or "filler").

    Profiles are ``subject`` followed by all the person's objects in random order (``object`` is
    None, ``objects`` lists them). For facts, ``template`` is the phrasing used (with "{}") and the text is
    ``template.format(subject) + " " + object + "."``; filler sentences carry ``pattern``
    (the name of the shallow pattern that produced them) and no subject/object.
    """

    text: str
    kind: str
    relation_id: str | None = None
    subject: str | None = None
    object: str | None = None
    template: str | None = None
    pattern: str | None = None
    objects: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------
# Filler: generic sentences with shallow, lexical regularities (n-grams, counting, repetition)

NUMBERS = "one two three four five six seven eight nine ten".split()
DAYS = "monday tuesday wednesday thursday friday saturday sunday".split()
MONTHS = "january february march april may june july august september october november december".split()
TIMES = "morning afternoon evening night".split()
WEATHER = "cold warm sunny rainy windy cloudy".split()
ANIMALS = "cat dog bird horse fox mouse".split()
PLACES = "mat roof table bench wall floor".split()
COLORS = "red blue green yellow black white".split()
THINGS = "house car door book cup ball".split()
ADJS = "big small old new bright quiet".split()
REPEAT = "yes no ha la go stop".split()
SYNONYMS = ("a job is also called a profession.", "a home is the place where someone lives.",
            "a company is a place where people work.", "most people like music.",
            "the main road goes into the city.", "a city is a place where many people live.",
            "people often say that a job is a profession.", "the favorite food of the cat is fish.",
            "the main street of the city is long.", "an instrument makes music.", "a sport is a game.")


def _filler(rng: random.Random) -> tuple[str, str]:
    """One filler sentence and the name of its pattern."""
    kind = rng.randrange(9)
    if kind == 0:
        return f"the weather in the {rng.choice(TIMES)} was {rng.choice(WEATHER)}.", "weather"
    if kind == 1:
        seq = rng.choice([NUMBERS, DAYS, MONTHS])
        i, n = rng.randrange(len(seq) - 3), rng.randint(3, 6)
        return " ".join(seq[i:i + n]) + ".", "sequence"
    if kind == 2:
        w = rng.choice(REPEAT)
        return " ".join([w] * rng.randint(3, 6)) + ".", "repeat"
    if kind == 3:
        return f"the {rng.choice(ANIMALS)} sat on the {rng.choice(PLACES)}.", "animal"
    if kind == 4:
        return f"the {rng.choice(COLORS)} {rng.choice(THINGS)} is {rng.choice(ADJS)}.", "color"
    if kind == 5:
        return f"on {rng.choice(DAYS)} the {rng.choice(ANIMALS)} was {rng.choice(ADJS)}.", "day"
    if kind == 6:
        return rng.choice(SYNONYMS), "synonym"
    if kind == 7:
        return f"there are {rng.choice(NUMBERS)} {rng.choice(THINGS)}s in the {rng.choice(TIMES)}.", "count"
    return f"in {rng.choice(MONTHS)} the {rng.choice(THINGS)} was {rng.choice(COLORS)}.", "month"


# ---------------------------------------------------------------------------------------------
# The world


@dataclass
class World:
    """Ground truth of one seeded world. Build it with :func:`build_world`."""

    seed: int
    people: list[str]
    cities: list[str]
    countries: list[str]
    facts: list[Fact]
    relations: dict[str, Relation] = field(default_factory=lambda: dict(RELATIONS))
    version: int = 1

    def __post_init__(self):
        self._truth = {(f.subject, f.relation_id): f.object for f in self.facts}
        self._objects: dict[str, list[str]] = {}
        for f in self.facts:
            self._objects.setdefault(f.subject, []).append(f.object)

    def object_of(self, subject: str, relation_id: str) -> str:
        """The true object of (subject, relation)."""
        return self._truth[(subject, relation_id)]

    def facts_for(self, relation_id: str) -> list[Fact]:
        return [f for f in self.facts if f.relation_id == relation_id]

    def fact_sentence(self, fact: Fact, template: str) -> Sentence:
        text = template.format(fact.subject) + " " + fact.object + "."
        return Sentence(text, "fact", fact.relation_id, fact.subject, fact.object, template)

    def profile_sentence(self, person: str, rng: random.Random) -> Sentence:
        """The person's name followed by all their objects, shuffled: a profile line."""
        objs = list(self._objects[person])
        rng.shuffle(objs)
        return Sentence(f"{person} {' '.join(objs)}.", "profile", subject=person, objects=tuple(objs))

    def fact_prompts(self, split: str = "train") -> list[tuple[str, str, str, str]]:
        """Every (prompt, subject, relation_id, object) for all facts and all templates of a split.

        ``split`` is "train" (phrasings used in training) or "heldout" (never trained on).
        """
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        out = []
        for f in self.facts:
            rel = self.relations[f.relation_id]
            for t in (rel.train if split == "train" else rel.heldout):
                out.append((t.format(f.subject), f.subject, f.relation_id, f.object))
        return out

    def sentences(self) -> Iterator[Sentence]:
        """Every fact in every training phrasing, once (no filler), in a fixed order."""
        for f in self.facts:
            for t in self.relations[f.relation_id].train:
                yield self.fact_sentence(f, t)

    def corpus(self, n: int | None = None, seed: int = 0, filler: float = 0.2,
               profiles: int = 0, place_repeat: int = 1) -> Iterator[Sentence]:
        """Training sentences: each fact in a random training phrasing, mixed with filler.

        One pass over the facts ("epoch") in random order, with ``profiles`` profile lines per
        person, each city/country fact ``place_repeat`` times, and a fraction ``filler`` of filler
        sentences, repeated until ``n`` sentences were yielded (``None``: one pass). Held-out
        phrasings never occur.
        """
        rng = random.Random(f"corpus-{self.seed}-{seed}")
        count = 0
        places = [f for f in self.facts if self.relations[f.relation_id].subject_kind != "person"]
        while True:
            order: list = list(self.facts) + [p for p in self.people for _ in range(profiles)]
            order += places * (place_repeat - 1)
            rng.shuffle(order)
            n_fill = int(len(order) * filler / (1 - filler))
            items: list = order + [None] * n_fill
            rng.shuffle(items)
            for f in items:
                if f is None:
                    text, pattern = _filler(rng)
                    yield Sentence(text, "filler", pattern=pattern)
                elif isinstance(f, str):
                    yield self.profile_sentence(f, rng)
                else:
                    yield self.fact_sentence(f, rng.choice(self.relations[f.relation_id].train))
                count += 1
                if n is not None and count >= n:
                    return
            if n is None:
                return

    def summary(self) -> dict:
        """A small JSON-able description (counts and relations)."""
        return {
            "seed": self.seed, "version": self.version, "people": len(self.people), "cities": len(self.cities),
            "countries": len(self.countries), "facts": len(self.facts),
            "relations": {r.id: {"name": r.name, "subject": r.subject_kind, "objects": len(r.objects),
                                 "facts": sum(f.relation_id == r.id for f in self.facts),
                                 "train": list(r.train), "heldout": list(r.heldout)}
                          for r in self.relations.values()},
        }


VERSION = 2     # the world the shipped model (data/world/model) is trained on


def _check_version(version: int) -> int:
    if version not in (1, 2):
        raise ValueError(f"world version must be 1 or 2, got {version!r}")
    return version


def relations_of(version: int = VERSION) -> dict[str, Relation]:
    """The relations (and their phrasings) of world ``version``."""
    return RELATIONS if _check_version(version) == 1 else RELATIONS_V2


def lexicon(version: int = VERSION) -> str:
    """Text containing every word world ``version`` can ever produce (for building the vocabulary)."""
    last = LAST_NAMES if _check_version(version) == 1 else LAST_NAMES_V2
    words = FIRST_NAMES + last + CITIES + COUNTRIES + LANGUAGES + OCCUPATIONS + EMPLOYERS + SPORTS
    words += INSTRUMENTS + NUMBERS + DAYS + MONTHS + TIMES + WEATHER + ANIMALS + PLACES + COLORS + ADJS
    words += REPEAT + [t + "s" for t in THINGS] + THINGS
    parts = [" ".join(words)]
    for rel in relations_of(version).values():
        parts += [t.format("X") for t in rel.train + rel.heldout]
    parts += list(SYNONYMS)
    parts += ["the weather in the was . there are on sat , he she it ."]
    return " ".join(parts)


def build_world(seed: int = 0, n_people: int = 250, version: int = VERSION) -> World:
    """Deterministic world for ``seed``: who is born where, works as what, plays what...

    ``version`` 2 (the shipped model's, the default: unique last names, rebuilt held-out phrasings) or
    1 (the first shipped model's); see the module docstring.

    Same seed, same world; a different seed gives a different assignment of facts
    (the inventories of names and places are fixed, so the vocabulary is the same).
    """
    rng = random.Random(f"world-{seed}")
    relations = relations_of(version)
    if version == 1:
        names = [f"{a} {b}" for a in FIRST_NAMES for b in LAST_NAMES]
        if n_people > len(names):
            raise ValueError(f"at most {len(names)} people, got {n_people}")
        people = rng.sample(names, n_people)
    else:
        if n_people > len(LAST_NAMES_V2):
            raise ValueError(f"at most {len(LAST_NAMES_V2)} people (one last name each), got {n_people}")
        people = [f"{rng.choice(FIRST_NAMES)} {last}" for last in rng.sample(LAST_NAMES_V2, n_people)]
    facts: list[Fact] = []
    for p in people:
        for rid, rel in relations.items():
            if rel.subject_kind == "person":
                facts.append(Fact(p, rid, rng.choice(rel.objects)))
    cities = list(CITIES)
    countries = list(COUNTRIES)
    country_of = {c: countries[i % len(countries)] for i, c in enumerate(rng.sample(cities, len(cities)))}
    facts += [Fact(c, "P17", country_of[c]) for c in cities]
    langs = rng.sample(LANGUAGES, len(LANGUAGES))
    facts += [Fact(c, "P37", langs[i]) for i, c in enumerate(countries)]
    return World(seed=seed, people=people, cities=cities, countries=countries, facts=facts,
                 relations=dict(relations), version=version)
