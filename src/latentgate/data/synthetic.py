"""Deterministic SQuAD-style synthetic QA task, small enough for a tiny word-level model to learn on CPU.

Every context is a few short, lower-case "fact" sentences about invented people ("zorvak lives in paris ."),
and the question asks for one attribute of one of them ("where does zorvak live ?"). The answer is always an
exact span of the context. All words are separated by single spaces and punctuation is its own word, so
`text.split()` is an exact word-level tokenisation and `vocabulary(spec)` lists every word that can appear.

Attributes (fact template -> question template; `{e}` entity, `{v}` value):

* city:       "{e} lives in {v} ."                   -> "where does {e} live ?"
* color:      "the favorite color of {e} is {v} ."   -> "what is the favorite color of {e} ?"
* pet:        "{e} owns a {v} ."                     -> "what animal does {e} own ?"
* food:       "{e} likes to eat {v} ."               -> "what does {e} like to eat ?"
* job:        "{e} works as a {v} ."                 -> "what is the job of {e} ?"
* instrument: "{e} plays the {v} ."                  -> "which instrument does {e} play ?"
* sport:      "{e} enjoys playing {v} ."             -> "which sport does {e} enjoy ?"
* age:        "{e} is {v} old ."   ({v} = "37 years")         -> "how old is {e} ?"
* height:     "{e} is {v} tall ."  ({v} = "172 centimeters")  -> "how tall is {e} ?"

With ``answer_length=1`` every value is one word: the unit moves into the template ("{e} is {v} years old .")
and the word attributes use only one-word values. With ``answer_length=2`` half of each word attribute's
values are two words ("dark red", "bus driver") and ages/heights are number+unit spans, which also carry the
bare number as a second reference ("37 years", "37").

Difficulty knobs (`SyntheticSpec`): facts per context (more distractors), number of invented entities, size of
each attribute's value list, and the maximum answer length. The entity names and value lists depend only on
the spec, never on the seed, so the vocabulary is stable across seeds and splits.

Each context picks 1..facts_per_context distinct entities and gives every one at least one fact, so entities are
often mentioned several times and the same attribute is often stated for several entities: the model has to
match both the entity and the attribute. No (entity, attribute) pair repeats within a context.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import lru_cache

from latentgate.data.records import Example
from latentgate.errors import ConfigError

MAX_VALUES_PER_ATTRIBUTE = 100
MAX_ANSWER_LENGTH = 2

# ---------------------------------------------------------------------------------------------------------------
# Attribute tables. Word attributes: (name, fact template, question template, one-word values, modifiers).
# Two-word values are "<modifier> <value>"; when the natural lists run out, one-word values are extended with
# the concatenation "<modifier><value>" (e.g. "darkred"), which keeps them single tokens.
# All value words start with a consonant so "a {v}" reads naturally.

_WORD_ATTRIBUTES: tuple[tuple[str, str, str, tuple[str, ...], tuple[str, ...]], ...] = (
    (
        "city",
        "{e} lives in {v} .",
        "where does {e} live ?",
        tuple(
            "paris london tokyo berlin rome madrid cairo lima oslo dublin vienna prague warsaw athens lisbon "
            "moscow delhi seoul sydney toronto chicago boston denver dallas miami seattle houston munich milan "
            "naples geneva zurich bangkok manila jakarta nairobi lagos dakar havana quito bogota santiago".split()
        ),
        tuple("north south east west new upper lower central".split()),
    ),
    (
        "color",
        "the favorite color of {e} is {v} .",
        "what is the favorite color of {e} ?",
        tuple(
            "red blue green yellow purple orange pink brown black white gray gold silver teal violet indigo "
            "beige maroon navy cyan magenta olive coral crimson amber ivory turquoise lavender scarlet tan".split()
        ),
        tuple("dark light pale bright deep soft".split()),
    ),
    (
        "pet",
        "{e} owns a {v} .",
        "what animal does {e} own ?",
        tuple(
            "dog cat rabbit hamster parrot horse pony goat sheep pig cow duck goose chicken turtle tortoise "
            "lizard snake frog mouse rat ferret gerbil canary pigeon donkey llama fox wolf bear".split()
        ),
        tuple("big small tiny fat lazy black white brown spotted young".split()),
    ),
    (
        "food",
        "{e} likes to eat {v} .",
        "what does {e} like to eat ?",
        tuple(
            "rice pasta soup bread cheese noodles pizza salad beans fish steak tacos curry sushi cake cookies "
            "honey melons grapes apples pears plums carrots potatoes olives dumplings pancakes waffles "
            "porridge yogurt".split()
        ),
        tuple("fried baked spicy sweet grilled roasted fresh hot".split()),
    ),
    (
        "job",
        "{e} works as a {v} .",
        "what is the job of {e} ?",
        tuple(
            "doctor teacher baker farmer pilot nurse lawyer dentist painter writer singer dancer chef builder "
            "plumber banker tailor guard judge miner sailor soldier waiter cook barber butcher cashier driver "
            "fisher gardener hunter janitor librarian mechanic poet ranger surgeon".split()
        ),
        tuple("bus taxi night head ship train school city".split()),
    ),
    (
        "instrument",
        "{e} plays the {v} .",
        "which instrument does {e} play ?",
        tuple(
            "piano violin guitar drums flute cello harp trumpet banjo oboe clarinet tuba saxophone trombone "
            "ukulele accordion harmonica mandolin bagpipes xylophone organ viola lute sitar bassoon piccolo "
            "horn marimba".split()
        ),
        tuple("electric acoustic bass grand steel toy little silver".split()),
    ),
    (
        "sport",
        "{e} enjoys playing {v} .",
        "which sport does {e} enjoy ?",
        tuple(
            "tennis soccer hockey golf rugby cricket baseball basketball volleyball badminton polo squash "
            "bowling handball lacrosse softball darts snooker billiards netball curling croquet archery "
            "fencing boxing rowing sailing surfing skiing karate judo".split()
        ),
        tuple("table beach ice water field street indoor snow".split()),
    ),
)

# Numeric attributes: (name, unit, number range, template with unit in the value, template with unit in text,
# question template).
_NUMERIC_ATTRIBUTES: tuple[tuple[str, str, range, str, str, str], ...] = (
    ("age", "years", range(15, 115), "{e} is {v} old .", "{e} is {v} years old .", "how old is {e} ?"),
    (
        "height",
        "centimeters",
        range(120, 220),
        "{e} is {v} tall .",
        "{e} is {v} centimeters tall .",
        "how tall is {e} ?",
    ),
)

ATTRIBUTES: tuple[str, ...] = tuple(a[0] for a in _WORD_ATTRIBUTES) + tuple(a[0] for a in _NUMERIC_ATTRIBUTES)
PUNCTUATION: tuple[str, ...] = (".", "?")

# Syllable parts for invented entity names: onset + vowel + middle + vowel + coda, e.g. "z"+"o"+"rv"+"a"+"k".
_ONSETS = tuple("b d f g k l m n p r s t v z br dr gr kr tr st sk pl th sh ch zh j y w".split())
_VOWELS = tuple("a e i o u".split())
_MIDDLES = tuple("l r n m v lt rv nd rk sk lm rt nt".split())
_CODAS = ("", "k", "n", "r", "x", "s", "th", "l", "m", "z")


@dataclass(frozen=True)
class SyntheticSpec:
    """Difficulty knobs of the synthetic task. Validated on construction (`ConfigError` on a bad value)."""

    facts_per_context: int = 4  # fact sentences in each context (distractors = facts - 1)
    num_entities: int = 200  # number of invented names
    values_per_attribute: int = 24  # size of each attribute's value list
    answer_length: int = 2  # max words in an answer value: 1 = one-word answers only, 2 = mix of 1 and 2

    @classmethod
    def of(cls, data) -> SyntheticSpec:
        """The knobs of the config's `data` section."""
        return cls(facts_per_context=data.facts_per_context, num_entities=data.num_entities,
                   values_per_attribute=data.values_per_attribute, answer_length=data.answer_length)

    def __post_init__(self) -> None:
        limits = {
            "facts_per_context": (1, len(ATTRIBUTES) * max(1, _int_or_zero(self.num_entities))),
            "num_entities": (1, len(_entity_pool())),
            "values_per_attribute": (2, MAX_VALUES_PER_ATTRIBUTE),
            "answer_length": (1, MAX_ANSWER_LENGTH),
        }
        for name, (lo, hi) in limits.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(
                    f"synthetic {name} must be an integer, got {type(value).__name__} {value!r}",
                    fix=f"set {name} to an integer between {lo} and {hi}",
                )
            if not lo <= value <= hi:
                why = (
                    f" ({len(ATTRIBUTES)} attributes x {self.num_entities} entities)"
                    if name == "facts_per_context"
                    else ""
                )
                raise ConfigError(
                    f"synthetic {name}={value} is out of range [{lo}, {hi}]{why}",
                    fix=f"set {name} between {lo} and {hi}",
                )


def _int_or_zero(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


# ---------------------------------------------------------------------------------------------------------------
# Deterministic tables (depend only on the spec, cached).


def _template_words() -> set[str]:
    words: set[str] = set()
    for _, fact, question, _, _ in _WORD_ATTRIBUTES:
        words.update(fact.split())
        words.update(question.split())
    for _, unit, _, fact2, fact1, question in _NUMERIC_ATTRIBUTES:
        words.update(fact2.split())
        words.update(fact1.split())
        words.update(question.split())
        words.add(unit)
    words -= {"{e}", "{v}"}
    return words


@lru_cache(maxsize=None)
def _reserved_words() -> frozenset[str]:
    """Every non-entity word any spec can emit (except numbers), so entity names can avoid them all."""
    words = set(_template_words()) | set(PUNCTUATION)
    for _, _, _, natural, mods in _WORD_ATTRIBUTES:
        words.update(natural)
        words.update(mods)
        words.update(m + b for m in mods for b in natural)
    return frozenset(words)


@lru_cache(maxsize=None)
def _entity_pool() -> tuple[str, ...]:
    """All candidate names in one fixed pseudo-random order; `num_entities` takes a prefix."""
    names = [o + v1 + m + v2 + c for o in _ONSETS for v1 in _VOWELS for m in _MIDDLES for v2 in _VOWELS for c in _CODAS]
    random.Random("latentgate-synthetic-entities").shuffle(names)
    reserved = _reserved_words()
    seen: set[str] = set()
    pool = []
    for name in names:
        if name not in reserved and name not in seen:
            seen.add(name)
            pool.append(name)
    return tuple(pool)


@lru_cache(maxsize=64)
def _entities(num_entities: int) -> tuple[str, ...]:
    return _entity_pool()[:num_entities]


@lru_cache(maxsize=64)
def _tables(values_per_attribute: int, answer_length: int):
    """Per attribute: (name, (fact text before entity, between entity and value, after value),
    (question text before entity, after entity), values, numeric flag). Every template puts the entity first."""
    k = values_per_attribute
    tables = []
    for name, fact, question, natural, mods in _WORD_ATTRIBUTES:
        concatenated = [m + b for m in mods for b in natural if m + b not in natural]
        one_word = list(dict.fromkeys(list(natural) + concatenated))
        if answer_length == 1:
            values = one_word[:k]
        else:
            two_word = [f"{m} {b}" for m in mods for b in natural]
            random.Random(f"latentgate-synthetic-values-{name}").shuffle(two_word)
            values = []
            i1 = i2 = 0
            while len(values) < k:  # alternate one-word and two-word values
                if len(values) % 2 == 0:
                    values.append(one_word[i1])
                    i1 += 1
                else:
                    values.append(two_word[i2])
                    i2 += 1
        tables.append((name, _split_fact(fact), _split_question(question), tuple(values), False))
    for name, unit, numbers, fact2, fact1, question in _NUMERIC_ATTRIBUTES:
        nums = [str(n) for n in numbers]
        random.Random(f"latentgate-synthetic-values-{name}").shuffle(nums)
        nums = nums[:k]
        if answer_length == 1:
            tables.append((name, _split_fact(fact1), _split_question(question), tuple(nums), False))
        else:
            values = tuple(f"{n} {unit}" for n in nums)
            tables.append((name, _split_fact(fact2), _split_question(question), values, True))
    return tuple(tables)


def _split_fact(template: str) -> tuple[str, str, str]:
    before, rest = template.split("{e}")
    middle, after = rest.split("{v}")
    return before, middle, after


def _split_question(template: str) -> tuple[str, str]:
    before, after = template.split("{e}")
    return before, after


# ---------------------------------------------------------------------------------------------------------------
# Public API


def generate(n: int, seed: int, spec: SyntheticSpec, id_prefix: str = "syn") -> list[Example]:
    """`n` examples, identical for the same (n, seed, spec); ids are f"{id_prefix}-{seed}-{i}".

    Uses only `random.Random(seed)`, never the global RNG. A prefix of a longer run equals a shorter run.
    """
    return _generate(n, seed, spec, id_prefix, exclude=None)


def make_splits(
    spec: SyntheticSpec, seed: int, n_train: int, n_eval: int, n_probe: int, *, id_prefix: str = "syn"
) -> dict[str, list[Example]]:
    """Train/eval/probe splits from disjoint derived seeds (3*seed, 3*seed+1, 3*seed+2).

    No context occurs in two splits: eval skips contexts already in train, probe skips train and eval ones.
    Ids are f"{id_prefix}-{split}-{derived_seed}-{i}", unique across splits.
    """
    train = _generate(n_train, 3 * seed, spec, f"{id_prefix}-train", exclude=None)
    seen = {ex.context for ex in train}
    evals = _generate(n_eval, 3 * seed + 1, spec, f"{id_prefix}-eval", exclude=seen)
    seen |= {ex.context for ex in evals}
    probe = _generate(n_probe, 3 * seed + 2, spec, f"{id_prefix}-probe", exclude=seen)
    return {"train": train, "eval": evals, "probe": probe}


def entities(spec: SyntheticSpec) -> list[str]:
    """The `spec.num_entities` invented names (fixed order, independent of any seed; a larger spec extends it)."""
    return list(_entities(spec.num_entities))


def vocabulary(spec: SyntheticSpec) -> list[str]:
    """Every word `generate(..., spec)` can emit (sorted): template words, punctuation, entities, value words."""
    words = set(PUNCTUATION)
    for _, fact, question, values, _ in _tables(spec.values_per_attribute, spec.answer_length):
        for part in fact + question:
            words.update(part.split())
        for value in values:
            words.update(value.split())
    words.update(_entities(spec.num_entities))
    return sorted(words)


def _generate(n: int, seed: int, spec: SyntheticSpec, id_prefix: str, exclude: set[str] | None) -> list[Example]:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ConfigError(f"number of synthetic examples must be a non-negative integer, got {n!r}")
    if not isinstance(spec, SyntheticSpec):
        raise ConfigError(f"spec must be a SyntheticSpec, got {type(spec).__name__}")
    rng = random.Random(seed)
    entities = _entities(spec.num_entities)
    tables = _tables(spec.values_per_attribute, spec.answer_length)
    n_attr = len(tables)
    n_facts = spec.facts_per_context
    k_min = max(1, math.ceil(n_facts / n_attr))
    k_max = min(n_facts, len(entities))
    randrange, randint, sample, shuffle = rng.randrange, rng.randint, rng.sample, rng.shuffle
    max_attempts = 1000
    out: list[Example] = []
    for i in range(n):
        for _attempt in range(max_attempts):
            k = randint(k_min, k_max)
            ents = sample(entities, k)
            # every chosen entity gets at least one fact; the rest are random unused (entity, attribute) pairs
            pairs = [(e, randrange(n_attr)) for e in range(k)]
            used = set(pairs)
            while len(pairs) < n_facts:
                pair = (randrange(k), randrange(n_attr))
                if pair not in used:
                    used.add(pair)
                    pairs.append(pair)
            shuffle(pairs)
            asked = randrange(n_facts)
            sentences = []
            pos = 0
            for j, (e, a) in enumerate(pairs):
                table = tables[a]
                before, middle, after = table[1]
                values = table[3]
                value = values[randrange(len(values))]
                head = before + ents[e] + middle
                if j == asked:
                    start = pos + len(head)
                    answer = value
                    question = table[2][0] + ents[e] + table[2][1]
                    numeric = table[4]
                sentence = head + value + after
                sentences.append(sentence)
                pos += len(sentence) + 1
            context = " ".join(sentences)
            if exclude is None or context not in exclude:
                break
        else:
            raise ConfigError(
                f"could not draw a synthetic context not already used by another split after {max_attempts} tries",
                fix="raise num_entities, values_per_attribute or facts_per_context, or ask for fewer examples",
            )
        if numeric:
            answers: tuple[str, ...] = (answer, answer.split(" ", 1)[0])
            starts: tuple[int, ...] = (start, start)
        else:
            answers, starts = (answer,), (start,)
        out.append(Example(f"{id_prefix}-{seed}-{i}", context, question, answers, starts))
    return out
