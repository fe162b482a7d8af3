"""Deterministic synthetic text: a depth (multi-hop) task and template-grammar prose.

Everything here is pure Python driven by ``random.Random`` instances seeded from explicit strings,
so the same arguments give the same data on every run and machine (string seeds are hashed with
SHA-512, not with the per-process ``hash``).

Depth task
----------
A problem is a list of assignments over single-letter variables followed by a query::

    k=3;q=k+4;b=7;z=q*3;e=z-5;?e=6
    '------- prompt -----------''answer

* The text has no spaces, so with the byte-level tokenizer every variable and every digit is one
  token, the same token wherever it occurs (with ``"; "`` separators a variable would be one token
  after a space and another after ``=``, an aliasing the task does not need).
* Arithmetic is modulo 10, so every value, and so every answer, is one digit: one token.
* Operators are ``+k`` and ``-k`` with k in 1..9 and ``*k`` with k in {3, 7, 9}. Every hop is then a
  bijection of Z/10, so answers are uniform over 0..9 at every depth: a model cannot guess deep
  answers from a skewed prior.
* The depth of a problem is the number of operations between a literal and the queried variable:
  ``a=3;b=a+4;?b=`` has depth 1. Depth d needs d dependent look-ups, which is what loops buy.
* Distractors are extra assignments interleaved with the chain, either new literals or branches off
  any earlier variable; the queried value never depends on them. Letters are drawn per problem.
* Train/test split: a problem is in the test split iff a hash of its *chain* (start value and
  operator sequence, ignoring letters and distractors) falls in the lowest ``TEST_FRACTION`` of the
  hash range. The splits are disjoint by construction: no test computation is ever trained on,
  under any renaming. Held-out depths are a second, independent axis: train on
  ``depths=(1, 2, 3, 4)`` and evaluate on ``depths=(5, 6)``.
* Two written forms of the same chains. ``form="variables"`` (the default) is the assignment list
  above. ``form="expression"`` writes the chain alone, evaluated left to right, with no names and no
  distractors: ``3+4*3-5=6`` is depth 3 (((3+4)*3)-5 mod 10). It keeps the sequential dependence
  (every hop needs the value before it) and drops the name look-ups, which tiny models are slow to
  learn; ``benchmarks.reproduce`` uses it.
* Evaluation: ``depth_problems(..., split="test")`` returns ``Problem(prompt, answer, depth)``; a model
  is scored by exact match of the one answer token after the prompt. The prompt ends in ``=`` and
  the tokenizer (``convert.tokenizer``) isolates digits, so the tokens of ``prompt + answer`` are the
  tokens of ``prompt`` followed by the answer digit's token.

Prose
-----
Sentences from a small template grammar (names, animals, objects, places, adjectives, verbs: about
three hundred words), three to seven per document, so the model also sees ordinary text.

Corpus records (JSON lines)
---------------------------
``make_corpus`` returns, and ``write_jsonl`` and the command line write, one JSON object per line
with exactly one of two fields:

* ``{"text": ...}``: a depth document (solved problems, one ``prompt + answer`` per line) or prose.
* ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}``: a chat,
  either a depth problem (user: the prompt, assistant: the answer digit) or a question about prose.

``convert.data.load_text_dataset`` reads both kinds, rendering chats with the tokenizer's template.

Command line::

    python -m convert.synthetic --out convert/assets/tiny_corpus.jsonl --docs 1000 --seed 0
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Record = dict[str, Any]
Message = dict[str, str]

MODULUS = 10
TEST_FRACTION = 0.1
SPLITS = ("train", "test")
DEFAULT_DEPTHS = (1, 2, 3, 4, 5, 6)
FORMS = ("variables", "expression")
# Operands that keep each operator a bijection of Z/10: no identity, no zero divisors.
OPERANDS: dict[str, tuple[int, ...]] = {"+": tuple(range(1, 10)), "-": tuple(range(1, 10)), "*": (3, 7, 9)}
VARIABLES = string.ascii_lowercase


@dataclass(frozen=True)
class Problem:
    """One depth-task item: after reading ``prompt`` a model must emit ``answer`` (one digit)."""

    prompt: str  # assignments, then ";?<variable>="
    answer: str  # the queried variable's value, one digit
    depth: int  # operations between a literal and the queried variable

    @property
    def text(self) -> str:
        """The solved problem as it appears in training documents."""
        return self.prompt + self.answer

    def to_messages(self) -> list[Message]:
        """The problem as a chat: the user asks the prompt, the assistant answers the digit."""
        return [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.answer}]


def _apply(operator: str, value: int, operand: int) -> int:
    """``value <operator> operand`` modulo 10."""
    if operator == "+":
        return (value + operand) % MODULUS
    if operator == "-":
        return (value - operand) % MODULUS
    return (value * operand) % MODULUS


def chain_split(start: int, hops: Sequence[tuple[str, int]]) -> str:
    """The split ("train" or "test") a chain belongs to: a stable hash of its values, not of names."""
    key = f"{start}|" + ",".join(f"{operator}{operand}" for operator, operand in hops)
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return "test" if int.from_bytes(digest, "big") < TEST_FRACTION * 2**64 else "train"


def _sample_hop(rng: random.Random) -> tuple[str, int]:
    operator = rng.choice(tuple(OPERANDS))
    return operator, rng.choice(OPERANDS[operator])


def _check_depth_settings(depths: Sequence[int], distractors: tuple[int, int], split: str, form: str) -> None:
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not depths or any(depth < 1 for depth in depths):
        raise ValueError(f"depths must be a non-empty sequence of integers >= 1, got {tuple(depths)}")
    low, high = distractors
    if not 0 <= low <= high:
        raise ValueError(f"distractors must be an inclusive range 0 <= low <= high, got {distractors}")
    if max(depths) + 1 + high > len(VARIABLES):
        raise ValueError(
            f"depth {max(depths)} with up to {high} distractors needs {max(depths) + 1 + high} variables, "
            f"but only {len(VARIABLES)} letters exist; lower the depth or the distractor count"
        )


def _sample_problem(
    rng: random.Random, depth: int, split: str, distractors: tuple[int, int], form: str = "variables"
) -> Problem:
    # Rejection sampling on the chain's hash is what makes the splits disjoint.
    while True:
        start = rng.randrange(MODULUS)
        hops = [_sample_hop(rng) for _ in range(depth)]
        if chain_split(start, hops) == split:
            break
    if form == "expression":
        value = start
        for operator, operand in hops:
            value = _apply(operator, value, operand)
        prompt = str(start) + "".join(f"{operator}{operand}" for operator, operand in hops) + "="
        return Problem(prompt=prompt, answer=str(value), depth=depth)
    num_distractors = rng.randint(*distractors)
    names = rng.sample(VARIABLES, depth + 1 + num_distractors)
    chain_names, distractor_names = names[: depth + 1], iter(names[depth + 1 :])

    value = start
    chain_statements = [f"{chain_names[0]}={start}"]
    for (operator, operand), source, target in zip(hops, chain_names, chain_names[1:]):
        chain_statements.append(f"{target}={source}{operator}{operand}")
        value = _apply(operator, value, operand)

    # The chain keeps its order; distractors land in random slots and may read any earlier variable.
    total = len(chain_statements) + num_distractors
    distractor_slots = set(rng.sample(range(total), num_distractors))
    chain_iter = iter(zip(chain_names, chain_statements))
    statements: list[str] = []
    defined: list[str] = []
    for slot in range(total):
        if slot in distractor_slots:
            name = next(distractor_names)
            if defined and rng.random() < 0.5:
                operator, operand = _sample_hop(rng)
                statements.append(f"{name}={rng.choice(defined)}{operator}{operand}")
            else:
                statements.append(f"{name}={rng.randrange(MODULUS)}")
        else:
            name, statement = next(chain_iter)
            statements.append(statement)
        defined.append(name)
    prompt = ";".join(statements) + f";?{chain_names[-1]}="
    return Problem(prompt=prompt, answer=str(value), depth=depth)


def depth_problems(
    n: int,
    seed: int,
    depths: Sequence[int] = DEFAULT_DEPTHS,
    split: str = "test",
    distractors: tuple[int, int] = (0, 3),
    form: str = "variables",
) -> list[Problem]:
    """``n`` depth-task problems of one split; depths cycle through ``depths`` so each is equally used.

    Args:
        n: number of problems.
        seed: the same (seed, split, depths, distractors) always gives the same problems.
        depths: depths to draw, in the order they cycle (problem i has depth ``depths[i % len(depths)]``).
        split: "test" for evaluation, "train" for training data; disjoint by construction.
        distractors: inclusive range of distractor assignments per problem (variables form only).
        form: "variables" (assignments, then a query) or "expression" (the bare chain, ``3+4*3=``).
    """
    _check_depth_settings(depths, distractors, split, form)
    rng = random.Random(f"depth-problems/{split}/{seed}")
    return [_sample_problem(rng, depths[i % len(depths)], split, distractors, form) for i in range(n)]


def render_depth_document(problems: Iterable[Problem]) -> str:
    """A training document: one solved problem (``prompt + answer``) per line."""
    return "\n".join(problem.text for problem in problems)


# Template grammar -------------------------------------------------------------------------------

NAMES = (
    "Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Henry", "Iris", "Jack", "Kate", "Leo",
    "Maya", "Noah", "Olivia", "Paul", "Rosa", "Sam", "Tara", "Victor", "Wendy", "Yusuf", "Zoe", "Omar",
    "Lena", "Hugo", "Nina", "Ivan", "Mia", "Theo",
)  # fmt: skip
ANIMALS = (
    "cat", "dog", "fox", "bird", "horse", "rabbit", "mouse", "owl", "fish", "bear", "wolf", "deer",
    "duck", "goat", "frog", "lion", "tiger", "sheep", "cow", "pig", "hen", "snail", "bee", "turtle",
)  # fmt: skip
OBJECTS = (
    "book", "box", "cup", "lamp", "key", "chair", "table", "door", "window", "ball", "coat", "hat",
    "boat", "car", "bike", "clock", "letter", "map", "coin", "bell", "basket", "bottle", "brush",
    "candle", "drum", "flag", "glove", "kite", "ladder", "mirror", "pencil", "ring", "rope", "shoe",
    "spoon", "stone", "tent", "toy", "wheel", "apple", "bread", "cake", "cheese", "egg", "orange",
    "pear", "plate", "blanket", "umbrella", "shell", "feather", "leaf", "knife", "scarf",
)  # fmt: skip
NOUNS = ANIMALS + OBJECTS
COLORS = ("red", "blue", "green", "yellow", "white", "black", "brown", "orange", "purple", "grey")
ADJECTIVES = COLORS + (
    "small", "big", "old", "young", "quiet", "loud", "happy", "sad", "bright", "dark", "warm", "cold",
    "soft", "hard", "heavy", "light", "clean", "dirty", "fast", "slow", "tall", "short", "round",
    "new", "strange", "famous", "tiny", "huge", "gentle", "brave", "clever", "lazy", "busy", "sleepy",
    "wooden", "golden", "shiny", "empty", "full", "wet", "dry", "funny",
)  # fmt: skip
PLACES = (
    "garden", "kitchen", "forest", "river", "market", "school", "library", "village", "city", "park",
    "beach", "field", "hill", "lake", "station", "farm", "house", "bridge", "harbor", "castle",
    "museum", "street", "valley", "island", "bakery", "attic", "barn", "meadow",
)  # fmt: skip
TRANSITIVE_VERBS = (
    "saw", "found", "took", "lost", "carried", "painted", "washed", "opened", "closed", "moved",
    "dropped", "cleaned", "bought", "sold", "watched", "followed", "chased", "lifted", "hid", "fixed",
    "broke", "pushed", "pulled", "held", "touched", "counted", "drew", "kept", "wanted", "liked",
)  # fmt: skip
INTRANSITIVE_VERBS = (
    "slept", "ran", "laughed", "waited", "sang", "danced", "smiled", "jumped", "walked", "rested",
    "listened", "played", "swam", "worked", "talked", "whispered", "shouted", "arrived", "left", "hummed",
)  # fmt: skip
ADVERBS = (
    "quickly", "slowly", "quietly", "happily", "carefully", "suddenly", "often", "gently", "loudly",
    "early", "late", "again", "together", "alone", "proudly",
)  # fmt: skip
TIMES = (
    "in the morning", "at night", "after lunch", "before dinner", "on Monday", "on Sunday",
    "in the spring", "in the winter", "every day", "yesterday", "last week", "at noon",
)  # fmt: skip
PREPOSITIONS = ("in", "near", "behind", "under", "beside", "across", "inside", "outside")
DETERMINERS = ("the", "the", "a", "my", "her", "his", "our", "that")
NUMBER_WORDS = ("two", "three", "four", "five", "six", "seven", "eight", "nine")
IRREGULAR_PLURALS = {
    "mouse": "mice", "sheep": "sheep", "fish": "fish", "deer": "deer", "wolf": "wolves",
    "leaf": "leaves", "knife": "knives", "scarf": "scarves",
}  # fmt: skip


def _plural(noun: str) -> str:
    if noun in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[noun]
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def _indefinite(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _noun_phrase(rng: random.Random, noun: str | None = None) -> str:
    noun = noun or rng.choice(NOUNS)
    if rng.random() < 0.5:
        noun = f"{rng.choice(ADJECTIVES)} {noun}"
    determiner = rng.choice(DETERMINERS)
    return _indefinite(noun) if determiner == "a" else f"{determiner} {noun}"


def _subject(rng: random.Random) -> str:
    return rng.choice(NAMES) if rng.random() < 0.5 else _noun_phrase(rng, rng.choice(ANIMALS))


# Sentence templates; `_sentence` fills every slot. The subject is a name or a noun phrase.
SENTENCE_TEMPLATES = (
    "{subject} {transitive} {thing} {preposition} the {place}",
    "{subject} {intransitive} {adverb} {time}",
    "in the {place}, {subject} {intransitive} {adverb}",
    "{time}, {subject} {transitive} {thing}",
    "{subject} was {adjective} because {name} {transitive} {thing}",
    "{subject} saw {number} {things} {preposition} the {place}",
    "{subject} {intransitive}, but {name} {other_intransitive} {adverb}",
    "{subject} gave {name} {gift}",
)


def _sentence(rng: random.Random, subject: str) -> str:
    template = rng.choice(SENTENCE_TEMPLATES)
    text = template.format(
        subject=subject,
        transitive=rng.choice(TRANSITIVE_VERBS),
        intransitive=rng.choice(INTRANSITIVE_VERBS),
        other_intransitive=rng.choice(INTRANSITIVE_VERBS),
        thing=_noun_phrase(rng),
        things=_plural(rng.choice(NOUNS)),
        gift=_indefinite(f"{rng.choice(ADJECTIVES)} {rng.choice(OBJECTS)}"),
        adjective=rng.choice(ADJECTIVES),
        adverb=rng.choice(ADVERBS),
        name=rng.choice(NAMES),
        number=rng.choice(NUMBER_WORDS),
        place=rng.choice(PLACES),
        preposition=rng.choice(PREPOSITIONS),
        time=rng.choice(TIMES),
    )
    return text[0].upper() + text[1:] + "."


def prose_document(rng: random.Random) -> str:
    """A paragraph of three to seven template sentences."""
    return " ".join(_sentence(rng, _subject(rng)) for _ in range(rng.randint(3, 7)))


def prose_chat(rng: random.Random) -> list[Message]:
    """A user question about a noun, a name or a place, answered in consistent prose."""
    kind = rng.randrange(3)
    name, place, time = rng.choice(NAMES), rng.choice(PLACES), rng.choice(TIMES)
    if kind == 0:
        noun = rng.choice(ANIMALS)
        question = f"Tell me a short story about {_indefinite(noun)}."
        sentences = [f"Once there was {_indefinite(rng.choice(ADJECTIVES) + ' ' + noun)}."]
        sentences += [_sentence(rng, f"the {noun}") for _ in range(rng.randint(2, 4))]
        answer = " ".join(sentences)
    elif kind == 1:
        question = f"Where did {name} go {time}?"
        answer = f"{name} went to the {place} {time}."
    else:
        thing = _noun_phrase(rng)
        question = f"What did {name} find in the {place}?"
        answer = f"{name} found {thing} in the {place}."
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


# Corpus ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CorpusMix:
    """Relative weights of the four document kinds of ``make_corpus`` and the depth task's settings."""

    depth_text: float = 0.4  # text documents of solved depth problems, one per line
    prose_text: float = 0.35  # template-grammar prose paragraphs
    depth_chat: float = 0.15  # chats: the user asks a depth problem, the assistant answers the digit
    prose_chat: float = 0.1  # chats: a question about a noun, name or place, answered in prose
    depths: tuple[int, ...] = DEFAULT_DEPTHS  # depths of training problems; omit some to hold them out
    distractors: tuple[int, int] = (0, 3)  # inclusive range of distractor assignments per problem
    form: str = "variables"  # how problems are written: "variables" or "expression" (see the module doc)
    problems_per_document: tuple[int, int] = (4, 8)  # inclusive range of problems per depth document

    @property
    def weights(self) -> dict[str, float]:
        return {
            "depth_text": self.depth_text,
            "prose_text": self.prose_text,
            "depth_chat": self.depth_chat,
            "prose_chat": self.prose_chat,
        }


def make_corpus(num_docs: int, seed: int, mix: CorpusMix = CorpusMix()) -> list[Record]:
    """``num_docs`` training records, each ``{"text": ...}`` or ``{"messages": [...]}``.

    Depth problems come from the train split only. The same (num_docs, seed, mix) always gives the
    same records.
    """
    weights = mix.weights
    if any(weight < 0 for weight in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"mix weights must be >= 0 with a positive sum, got {weights}")
    low, high = mix.problems_per_document
    if not 1 <= low <= high:
        raise ValueError(f"problems_per_document must satisfy 1 <= low <= high, got {(low, high)}")
    _check_depth_settings(mix.depths, mix.distractors, "train", mix.form)

    rng = random.Random(f"corpus/{seed}")

    def train_problem() -> Problem:
        return _sample_problem(rng, rng.choice(mix.depths), "train", mix.distractors, mix.form)

    records: list[Record] = []
    for kind in rng.choices(list(weights), weights=list(weights.values()), k=num_docs):
        if kind == "depth_text":
            problems = [train_problem() for _ in range(rng.randint(low, high))]
            records.append({"text": render_depth_document(problems)})
        elif kind == "prose_text":
            records.append({"text": prose_document(rng)})
        elif kind == "depth_chat":
            records.append({"messages": train_problem().to_messages()})
        else:
            records.append({"messages": prose_chat(rng)})
    return records


def write_jsonl(path: str | os.PathLike[str], records: Iterable[Record]) -> Path:
    """Write one JSON object per line, atomically: a temporary file beside ``path``, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8", newline="\n") as file:
            for record in records:
                file.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a deterministic synthetic corpus as JSON lines.")
    parser.add_argument("--out", required=True, type=Path, help="output .jsonl file")
    parser.add_argument("--docs", type=int, default=1000, help="number of records")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args(argv)
    records = make_corpus(args.docs, args.seed)
    path = write_jsonl(args.out, records)
    print(f"wrote {len(records)} records to {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
