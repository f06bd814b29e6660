"""The language mini zoo's text classification tasks, generated from templates and word lists.

Every task draws sentences from templates filled with words from fixed lists; a class is a
property of the sentence that the templates control (its sentiment, topic, tense, ...). The
zero-shot head of a task embeds short class *descriptions* (``TaskSpec.descriptions``) with the
base model, the text analogue of CLIP's prompt templates (:mod:`subboost.langzoo.model`).

Splits are drawn together from one seeded stream per (task, class): distinct sentences are
collected until the test, validation and training quotas of the class are filled (in that
order), so the three splits never share a sentence and a split is unchanged when only the sizes
of later splits change. Classes are balanced (counts differ by at most one); each split is
shuffled by a stream of its own. Randomness comes from :class:`random.Random` seeded with a
SHA-256 of ``(seed, task, stream)``: results do not depend on Python's hash salt, the process
or the platform. (A sentence fixes its class, so classes cannot share a sentence either.)

The tasks (fixed order: profiles take the first N). Six of them (all but *question* and
*emotion*, which have formats of their own) read one attribute each of the same *sentence
frame* ("{tone word} {subject} {verb phrase} {object}{time}.", six independent attributes, see
:func:`frame_sentence`), so they share one input distribution and differ in what they read
from it. *topic* comes late in the order because the base already solves it zero-shot.

=========== ========================================= ==========================================
task        classes                                   what decides the class
=========== ========================================= ==========================================
tone        bad news, good news                       opening word ("sadly," / "luckily,")
tense       past, present, future                     verb form ("won", "wins", "will win")
person      first, second, third person               subject (i/we, you, she/they/the ...)
question    person, place, time, quantity, reason     the question word or phrase
negation    affirmative, negated                      "not" / "n't" in the verb phrase
number      singular, plural                          subject ("i", "you", "she" / "we", "you all")
topic       sports, politics, science, music, food    verb and object vocabulary
emotion     joy, anger, fear, sadness                 the emotion word
=========== ========================================= ==========================================
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Callable

Sampler = Callable[[int, random.Random], str]
SPLIT_ORDER = ("test", "val", "train")  # quotas are filled in this order


@dataclass(frozen=True)
class TaskSpec:
    """One task: name, class names, per-class descriptions (embedded for the zero-shot head),
    a sampler ``sample(label, rng) -> sentence`` and a one-line description."""

    name: str
    classnames: tuple[str, ...]
    descriptions: tuple[tuple[str, ...], ...]
    sample: Sampler
    summary: str

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


@dataclass(frozen=True)
class TextSplit:
    """One split of one task: sentences, integer labels, class names."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]
    classnames: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.texts)

    def to_json(self) -> dict:
        return {"texts": list(self.texts), "labels": list(self.labels), "classnames": list(self.classnames)}

    @classmethod
    def from_json(cls, d: dict) -> "TextSplit":
        return cls(tuple(d["texts"]), tuple(int(x) for x in d["labels"]), tuple(d["classnames"]))


def _pick(rng: random.Random, items: tuple[str, ...] | list[str]) -> str:
    return items[rng.randrange(len(items))]


# ------------------------------------------------------------------ the shared sentence frame
#
# "{tone word} {subject} {verb phrase} {object}{time}." with six independent attributes:
# tone (bad / good news), tense, grammatical person, topic, negation, grammatical number.
# A frame task fixes one attribute to its label and draws the others uniformly, so the six
# frame tasks share one input distribution and differ only in what they read from it.

_TONE = (("sadly,", "unfortunately,", "regrettably,", "bad news:", "to everyone's dismay,", "alas,",
          "worryingly,", "sad to say,"),
         ("luckily,", "fortunately,", "happily,", "good news:", "to everyone's delight,", "thankfully,",
          "wonderfully,", "great news:"))
_PERSON_NOUNS = (("neighbour", "neighbours"), ("teacher", "teachers"), ("cousin", "cousins"), ("friend", "friends"),
                 ("child", "children"), ("student", "students"), ("doctor", "doctors"), ("uncle", "uncles"))
# topic -> (base, 3rd person singular, past, object)
_TOPIC_VERBS = (
    (("win", "wins", "won", "the final match"), ("watch", "watches", "watched", "the football game"),
     ("coach", "coaches", "coached", "the junior team"), ("train", "trains", "trained", "for the marathon"),
     ("play", "plays", "played", "a tennis match"), ("lose", "loses", "lost", "the championship game")),
    (("vote", "votes", "voted", "for the new senator"), ("support", "supports", "supported", "the tax reform"),
     ("join", "joins", "joined", "the election campaign"), ("criticise", "criticises", "criticised", "the prime minister"),
     ("sign", "signs", "signed", "the petition to parliament"), ("debate", "debates", "debated", "the budget bill")),
    (("study", "studies", "studied", "the chemical reaction"), ("observe", "observes", "observed", "a distant galaxy"),
     ("test", "tests", "tested", "the new vaccine"), ("measure", "measures", "measured", "the mass of the particle"),
     ("publish", "publishes", "published", "a paper on genetics"), ("analyse", "analyses", "analysed", "the rock samples")),
    (("sing", "sings", "sang", "the old ballad"), ("record", "records", "recorded", "a new album"),
     ("play", "plays", "played", "the piano concerto"), ("compose", "composes", "composed", "a symphony"),
     ("rehearse", "rehearses", "rehearsed", "with the orchestra"), ("perform", "performs", "performed", "the song live")),
    (("cook", "cooks", "cooked", "a spicy curry"), ("bake", "bakes", "baked", "a chocolate cake"),
     ("taste", "tastes", "tasted", "the fresh pasta"), ("order", "orders", "ordered", "a bowl of soup"),
     ("grill", "grills", "grilled", "the vegetables"), ("serve", "serves", "served", "the dessert")),
)
_FRAME_TIMES = (("yesterday", "last week", "two days ago", "last year"),
                ("every day", "each morning", "these days", "right now"),
                ("tomorrow", "next week", "in two days", "next year"))
FRAME_ATTRIBUTES = {"tone": 2, "tense": 3, "person": 3, "topic": 5, "negation": 2, "number": 2}


def _subject(person: int, plural: int, rng: random.Random) -> str:
    if person == 0:
        return "we" if plural else "i"
    if person == 1:
        return _pick(rng, ("you all", "you two", "all of you", "you both")) if plural else "you"
    noun = _pick(rng, _PERSON_NOUNS)[plural]
    if plural:
        return _pick(rng, ("they", f"the {noun}", f"my {noun}", f"our {noun}"))
    return _pick(rng, ("she", "he", f"the {noun}", f"my {noun}", f"our {noun}"))


def _verb_phrase(tense: int, negated: int, third_singular: bool, verb: tuple[str, str, str, str],
                 rng: random.Random) -> str:
    base, third, past, _ = verb
    short = rng.random() < 0.3  # contractions: "didn't", "won't", ...
    if tense == 0:
        return (("didn't " if short else "did not ") + base) if negated else past
    if tense == 1:
        if not negated:
            return third if third_singular else base
        aux = "does" if third_singular else "do"
        return (f"{aux}n't " if short else f"{aux} not ") + base
    return (("won't " if short else "will not ") + base) if negated else f"will {base}"


def frame_sentence(attributes: dict[str, int], rng: random.Random) -> str:
    """One sentence of the shared frame with the given attribute values (see ``FRAME_ATTRIBUTES``)."""
    a = attributes
    verb = _pick(rng, _TOPIC_VERBS[a["topic"]])
    subject = _subject(a["person"], a["number"], rng)
    third_singular = a["person"] == 2 and a["number"] == 0
    phrase = _verb_phrase(a["tense"], a["negation"], third_singular, verb, rng)
    time = f" {_pick(rng, _FRAME_TIMES[a['tense']])}" if rng.random() < 0.25 else ""
    return f"{_pick(rng, _TONE[a['tone']])} {subject} {phrase} {verb[3]}{time}."


def _frame_task(attribute: str) -> Sampler:
    def sample(label: int, rng: random.Random) -> str:
        values = {name: rng.randrange(k) for name, k in FRAME_ATTRIBUTES.items()}
        values[attribute] = label
        return frame_sentence(values, rng)

    sample.__name__ = f"frame_{attribute}"
    return sample


# ------------------------------------------------------------------ question type

_PEOPLE = ("my neighbour", "the teacher", "your brother", "the pilot", "the mayor", "the old farmer",
           "the new student", "her cousin", "the doctor", "the captain", "our guide", "the baker")
_VERBS_Q = (("paint", "the fence"), ("fix", "the car"), ("sell", "the house"), ("visit", "the castle"),
            ("buy", "the tickets"), ("find", "the keys"), ("cook", "the dinner"), ("open", "the shop"),
            ("write", "the letter"), ("build", "the bridge"), ("clean", "the kitchen"), ("move", "the boxes"))
_PAST_Q = {"paint": "painted", "fix": "fixed", "sell": "sold", "visit": "visited", "buy": "bought",
           "find": "found", "cook": "cooked", "open": "opened", "write": "wrote", "build": "built",
           "clean": "cleaned", "move": "moved"}
_COUNTABLE = ("apples", "chairs", "letters", "songs", "people", "books", "cars", "windows", "tickets", "boxes",
              "cakes", "photos")
_AUX = ("did", "will", "does", "can", "should")


def _question(label: int, rng: random.Random) -> str:
    person, (verb, obj), aux = _pick(rng, _PEOPLE), _pick(rng, _VERBS_Q), _pick(rng, _AUX)
    subject = person
    if label == 0:  # person
        form = _pick(rng, ("who {p} {o}{t}?", "who is going to {v} {o}{t}?", "which person {p} {o}{t}?",
                           "whose idea was it to {v} {o}{t}?", "who {a} {v} {o} for {s}?"))
        tail = _pick(rng, ("", " yesterday", " for the school", " last year", " in the end", " so quickly"))
        return form.format(p=_PAST_Q[verb], v=verb, o=obj, a=aux, s=subject, t=tail)
    if label == 1:  # place
        form = _pick(rng, ("where {a} {s} {v} {o}?", "in which town {a} {s} {v} {o}?",
                           "at what place {a} {s} {v} {o}?", "where exactly {a} {s} {v} {o}?"))
    elif label == 2:  # time
        form = _pick(rng, ("when {a} {s} {v} {o}?", "at what time {a} {s} {v} {o}?", "on which day {a} {s} {v} {o}?",
                           "what year {a} {s} {v} {o}?", "how soon {a} {s} {v} {o}?"))
    elif label == 3:  # quantity
        thing = _pick(rng, _COUNTABLE)
        form = _pick(rng, ("how many {t} {a} {s} {v}?", "what number of {t} {a} {s} {v}?",
                           "how much money {a} {s} spend to {v} {o}?", "how many times {a} {s} {v} {o}?"))
        return form.format(a=aux, s=subject, v=verb, o=obj, t=thing)
    else:  # reason
        form = _pick(rng, ("why {a} {s} {v} {o}?", "for what reason {a} {s} {v} {o}?", "what made {s} {v} {o}?",
                           "why on earth {a} {s} {v} {o}?", "how come {s} wants to {v} {o}?"))
    return form.format(a=aux, s=subject, v=verb, o=obj)


# ------------------------------------------------------------------ emotion

_EMOTIONS = (
    ("happy", "delighted", "thrilled", "cheerful", "overjoyed", "glad", "elated", "joyful"),
    ("furious", "angry", "annoyed", "outraged", "irritated", "enraged", "livid", "mad"),
    ("afraid", "scared", "terrified", "frightened", "nervous", "anxious", "panicked", "alarmed"),
    ("sad", "heartbroken", "depressed", "gloomy", "miserable", "unhappy", "sorrowful", "devastated"),
)
_EVENTS = ("the letter arrived", "the phone rang", "the results came out", "the door opened", "the bus stopped",
           "the lights went out", "her name was called", "the news was announced", "the guests left",
           "the storm began")
_EMO_PEOPLE = ("she", "he", "my mother", "the boy", "our neighbour", "i", "the old lady", "the driver")


def _emotion(label: int, rng: random.Random) -> str:
    word, person, event = _pick(rng, _EMOTIONS[label]), _pick(rng, _EMO_PEOPLE), _pick(rng, _EVENTS)
    form = _pick(rng, ("{p} felt {w} when {e}.", "{p} was {w} after {e}.", "when {e}, {p} was {w}.",
                       "{p} became {w} as soon as {e}."))
    return form.format(p=person, w=word, e=event)


# ------------------------------------------------------------------ registry

TASKS: tuple[TaskSpec, ...] = (
    TaskSpec("tone", ("bad news", "good news"),
             (("bad news", "an unfortunate event"), ("good news", "a fortunate event")),
             _frame_task("tone"), "frame: the opening word reports bad or good news ('sadly,' / 'luckily,')"),
    TaskSpec("tense", ("past", "present", "future"),
             (("the past", "it happened in the past"), ("the present", "it happens now"),
              ("the future", "it will happen in the future")),
             _frame_task("tense"), "frame: tense of the verb ('won', 'wins', 'will win')"),
    TaskSpec("person", ("first person", "second person", "third person"),
             (("first person", "the speaker talks about themselves"),
              ("second person", "the speaker talks to the listener"),
              ("third person", "the speaker talks about someone else")),
             _frame_task("person"), "frame: grammatical person of the subject (i/we, you, she/they)"),
    TaskSpec("question", ("person", "place", "time", "quantity", "reason"),
             (("a question about a person", "who is it?"), ("a question about a place", "where is it?"),
              ("a question about a time", "when is it?"), ("a question about a number", "how many are there?"),
              ("a question about a reason", "why is it?")),
             _question, "own format: what a question asks for (TREC-like question type)"),
    TaskSpec("negation", ("affirmative", "negated"),
             (("an affirmative statement", "it is so"), ("a negated statement", "it is not so")),
             _frame_task("negation"), "frame: whether the verb is negated ('did not', \"won't\")"),
    TaskSpec("number", ("singular", "plural"),
             (("one person", "a single person"), ("several people", "a group of people")),
             _frame_task("number"), "frame: grammatical number of the subject ('i', 'you' / 'we', 'you all')"),
    TaskSpec("topic", ("sports", "politics", "science", "music", "food"),
             (("sports", "a sentence about sports"), ("politics", "a sentence about politics"),
              ("science", "a sentence about science"), ("music", "a sentence about music"),
              ("food", "a sentence about food")),
             _frame_task("topic"), "frame: the topic of verb and object"),
    TaskSpec("emotion", ("joy", "anger", "fear", "sadness"),
             (("a feeling of joy", "someone is happy"), ("a feeling of anger", "someone is angry"),
              ("a feeling of fear", "someone is afraid"), ("a feeling of sadness", "someone is sad")),
             _emotion, "own format: the emotion a person feels"),
)
TASK_NAMES: tuple[str, ...] = tuple(t.name for t in TASKS)
_BY_NAME = {t.name: t for t in TASKS}


def get_task(name: str) -> TaskSpec:
    """A task by name; an unknown name raises ``ValueError`` listing the known ones."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown language task '{name}'; known: {', '.join(TASK_NAMES)}") from None


def task_rng(task: str, seed: int, stream: str = "") -> random.Random:
    """A random stream of the task: seeded by SHA-256 of ``(seed, task, stream)``, independent of
    Python's hash salt."""
    digest = hashlib.sha256(f"subboost-langzoo:{int(seed)}:{task}:{stream}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _quota(n: int, classes: int) -> list[int]:
    """Balanced per-class counts summing to ``n`` (the first ``n % classes`` classes get one more)."""
    return [n // classes + (1 if c < n % classes else 0) for c in range(classes)]


def generate(task: str, seed: int = 0, n_train: int = 512, n_val: int = 128, n_test: int = 256,
             max_tries: int = 200) -> dict[str, TextSplit]:
    """The ``train``, ``val`` and ``test`` splits of ``task`` (sizes are totals over classes).

    Sentences are distinct within and across splits. Raises ``ValueError`` if the templates of
    a class cannot give enough distinct sentences (``max_tries`` draws per sentence needed).
    """
    spec = get_task(task)
    sizes = {"train": int(n_train), "val": int(n_val), "test": int(n_test)}
    if any(v < 0 for v in sizes.values()):
        raise ValueError(f"split sizes must be ≥ 0, got {sizes}")
    quotas = {s: _quota(sizes[s], spec.num_classes) for s in SPLIT_ORDER}
    per_split: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLIT_ORDER}
    for label in range(spec.num_classes):
        rng = task_rng(task, seed, f"class {label}")  # one stream per class: quotas do not interact
        need = sum(quotas[s][label] for s in SPLIT_ORDER)
        got: list[str] = []
        seen: set[str] = set()
        tries = 0
        while len(got) < need:
            tries += 1
            if tries > max_tries * max(need, 1):
                raise ValueError(f"task '{task}', class '{spec.classnames[label]}': only {len(got)} distinct "
                                 f"sentences after {tries - 1} draws, {need} needed; lower the split sizes")
            text = spec.sample(label, rng)
            if text not in seen:
                seen.add(text)
                got.append(text)
        pos = 0
        for s in SPLIT_ORDER:
            k = quotas[s][label]
            per_split[s].extend((t, label) for t in got[pos:pos + k])
            pos += k
    out: dict[str, TextSplit] = {}
    for s in ("train", "val", "test"):
        items = per_split[s]
        task_rng(task, seed, f"shuffle {s}").shuffle(items)
        out[s] = TextSplit(tuple(t for t, _ in items), tuple(l for _, l in items), spec.classnames)
    return out
