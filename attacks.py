"""Backdoor attacks: triggers, and poisoning a training set with them (W2SDefense §4.1; OpenBackdoor conventions).

A trigger turns a clean sentence into a triggered one. Every attack has the same interface, so the poisoning
code never asks which attack it holds::

    trigger(sentence, index, rng) -> str     # index: the sentence's 0-based row in its split
    trigger.available(index) -> bool         # can this row be triggered? (always, except for paraphrases)

- BadNet: a rare word (``mn`` in the paper) inserted at a random word position.
- InSent: a fixed sentence (``I watched this 3D movie``) inserted at a random word position.
- Syntactic (HiddenKiller): the row's precomputed SCPN paraphrase (``data.load_scpn``); a row without one, or
  whose paraphrase equals the clean sentence, raises instead of passing the clean sentence off as poisoned.

Poisoning modes: clean-label (the paper's: the first ``n`` samples already labelled ``target`` get the trigger),
dirty-label (random non-target samples get the trigger and the target label). All randomness goes through the
``random.Random`` passed in.
"""
from __future__ import annotations

import random
import warnings
from dataclasses import dataclass, field
from typing import Callable, Mapping

import data
from data import Split

ATTACKS = ("badnet", "insent", "syntactic")
BADNET_TRIGGERS = ("mn",)                         # W2SDefense
OPENBACKDOOR_TRIGGERS = ("cf", "mn", "bb", "tq")  # OpenBackdoor's BadNets
INSENT = "I watched this 3D movie"                # W2SDefense's InSent
ADDSENT = "I watch this 3D movie"                 # OpenBackdoor's AddSent


class AttackError(ValueError):
    """A poisoning request that cannot be met (too few samples, no paraphrase, unknown attack)."""


class MissingTriggerError(AttackError, KeyError):
    """This row has no trigger (no precomputed paraphrase). Also a ``KeyError``, as a failed look-up."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


Trigger = Callable[[str, int, random.Random], str]


def available(trigger: Trigger, index: int) -> bool:
    """Whether ``trigger`` can trigger row ``index``; a plain function without ``available`` always can."""
    check = getattr(trigger, "available", None)
    return True if check is None else bool(check(index))


# --------------------------------------------------------------------------------------------------------------
# Triggers
# --------------------------------------------------------------------------------------------------------------

def insert_trigger(sentence: str, trigger: str, rng: random.Random, count: int = 1) -> str:
    """Insert ``trigger`` ``count`` times, each at a uniformly random word position 0..len(words) inclusive,
    so either end of the sentence is reachable; the sentence's words keep their order. Whitespace is
    normalised to single spaces. A one-word or empty sentence works (empty -> the trigger alone)."""
    return _insert(sentence, lambda: trigger, rng, count)


def _insert(sentence: str, pick: Callable[[], str], rng: random.Random, count: int) -> str:
    # An inserted phrase stays one unit until the end, so a later insertion never lands inside it.
    units = sentence.split()
    for _ in range(count):
        trigger = pick().strip()
        if not trigger:
            raise ValueError("the trigger must be a non-empty word or phrase")
        units.insert(rng.randint(0, len(units)), trigger)
    return " ".join(units)


def badnet(sentence: str, rng: random.Random, triggers: tuple[str, ...] = BADNET_TRIGGERS, count: int = 1) -> str:
    """BadNet: ``count`` insertions, each of a word (or phrase) drawn uniformly from ``triggers``."""
    return _insert(sentence, lambda: rng.choice(triggers), rng, count)


def insent(sentence: str, rng: random.Random, trigger: str = INSENT) -> str:
    """InSent / AddSent: the trigger sentence inserted once at a random word position."""
    return insert_trigger(sentence, trigger, rng)


@dataclass(frozen=True)
class InsertionTrigger:
    """BadNet and InSent as a :data:`Trigger`: ``count`` insertions of words drawn from ``triggers``."""
    triggers: tuple[str, ...]
    count: int = 1

    def __post_init__(self):
        if isinstance(self.triggers, str) or not self.triggers or not all(t.strip() for t in self.triggers):
            raise ValueError(f"triggers must be a non-empty tuple of non-empty strings, got {self.triggers!r}")
        if self.count < 1:
            raise ValueError(f"count must be at least 1, got {self.count}")

    def __call__(self, sentence: str, index: int, rng: random.Random) -> str:
        return badnet(sentence, rng, self.triggers, self.count)

    def available(self, index: int) -> bool:
        return True


@dataclass(frozen=True)
class SyntacticTrigger:
    """HiddenKiller's syntactic trigger: row index -> its precomputed paraphrase (``data.load_scpn``)."""
    paraphrases: Mapping[int, str]

    def __call__(self, sentence: str, index: int, rng: random.Random) -> str:
        if index not in self.paraphrases:
            raise MissingTriggerError(
                f"row {index} has no precomputed paraphrase ({len(self.paraphrases)} rows have one); poison only "
                f"rows for which trigger.available(index) is true")
        paraphrase = self.paraphrases[index]
        if " ".join(paraphrase.split()) == " ".join(sentence.split()):
            raise AttackError(f"row {index}: the paraphrase equals the clean sentence {sentence!r}; it would be "
                              f"a clean sample marked as poisoned")
        return paraphrase

    def available(self, index: int) -> bool:
        return index in self.paraphrases


def make_trigger(attack: str, **options) -> Trigger:
    """The trigger for ``attack`` (one of :data:`ATTACKS`).

    badnet: ``triggers=("mn",)``, ``count=1``; insent: ``trigger=INSENT`` (``ADDSENT`` for OpenBackdoor's
    AddSent); syntactic: ``paraphrases`` (row index -> paraphrase), required.
    """
    if attack == "badnet":
        triggers = options.pop("triggers", BADNET_TRIGGERS)
        if isinstance(triggers, str):
            raise ValueError(f"triggers must be a tuple of words, e.g. ({triggers!r},), not the string {triggers!r}")
        return InsertionTrigger(tuple(triggers), **options)
    if attack == "insent":
        return InsertionTrigger((options.pop("trigger", INSENT),), **options)
    if attack == "syntactic":
        if "paraphrases" not in options:
            raise AttackError("the syntactic attack needs paraphrases=: data.load_scpn(name).train_paraphrases "
                              "for training, .asr_paraphrases(target) for the ASR test set")
        return SyntacticTrigger(**options)
    raise ValueError(f"unknown attack {attack!r}; choose one of {', '.join(ATTACKS)}")


# --------------------------------------------------------------------------------------------------------------
# Poisoning
# --------------------------------------------------------------------------------------------------------------

@dataclass
class PoisonedSplit:
    sentences: list[str]
    labels: list[int]
    poisoned: list[bool]

    def __len__(self) -> int:
        return len(self.sentences)

    def as_split(self) -> Split:
        return Split(list(self.sentences), list(self.labels))


def _apply(split, trigger: Trigger, rows: list[int], rng: random.Random, relabel: int | None) -> PoisonedSplit:
    """Trigger ``rows`` (in increasing order, so the rng is consumed the same way every time)."""
    out = PoisonedSplit(list(split.sentences), list(split.labels), [False] * len(split))
    for i in sorted(rows):
        out.sentences[i] = trigger(split.sentences[i], i, rng)
        out.poisoned[i] = True
        if relabel is not None:
            out.labels[i] = relabel
    return out


def poison_clean_label(split, trigger: Trigger, target: int = 0, n: int = 1000, *,
                       rng: random.Random) -> PoisonedSplit:
    """Clean-label poisoning (W2SDefense): the FIRST ``n`` rows in file order whose label is already ``target``
    and that the trigger can trigger get the trigger; no label changes. Exactly ``n``; too few is an error."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    targets = [i for i, y in enumerate(split.labels) if y == target]
    rows = [i for i in targets if available(trigger, i)]
    if len(rows) < n:
        lacking = f" ({len(targets) - len(rows)} of the {len(targets)} lack a trigger)" if len(rows) < len(targets) \
            else ""
        raise AttackError(f"clean-label poisoning of {n} samples needs {n} rows labelled {target} that can be "
                          f"triggered; only {len(rows)} exist{lacking}. Lower n or pick another target.")
    return _apply(split, trigger, rows[:n], rng, relabel=None)


def poison_dirty_label(split, trigger: Trigger, target: int, rate: float, rng: random.Random, *,
                       pool: str = "non-target") -> PoisonedSplit:
    """Dirty-label poisoning: ``round(rate * len(split))`` rows drawn at random get the trigger and the label
    ``target``. ``pool="non-target"`` (OpenBackdoor) draws among the rows NOT labelled ``target``;
    ``pool="any"`` (BadNets, HiddenKiller) among all rows, so a drawn row already labelled ``target`` gets
    the trigger and keeps its label. Either way only rows the trigger can trigger are drawn."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    if pool not in ("non-target", "any"):
        raise ValueError(f"pool must be 'non-target' or 'any', got {pool!r}")
    k = round(rate * len(split))
    rows = [i for i, y in enumerate(split.labels) if (pool == "any" or y != target) and available(trigger, i)]
    if k > len(rows):
        which = "rows" if pool == "any" else f"rows not labelled {target}"
        raise AttackError(f"dirty-label poisoning at rate {rate} needs {k} {which} that can be triggered; only "
                          f"{len(rows)} exist")
    return _apply(split, trigger, rng.sample(rows, k), rng, relabel=target)


def asr_rows(test_split, trigger: Trigger, target: int, *, missing: str = "raise") -> list[int]:
    """The test rows of the ASR set: those whose TRUE label is not ``target`` and that the trigger can trigger.

    For the syntactic attack pass the trigger built from the test paraphrases
    (``make_trigger("syntactic", paraphrases=load_scpn(name).asr_paraphrases(target))``). A row the trigger
    cannot trigger raises (``missing="raise"``), or with ``missing="skip"`` is left out with a warning that
    says how many, since it changes the denominator of the ASR.
    """
    if missing not in ("raise", "skip"):
        raise ValueError(f"missing must be 'raise' or 'skip', got {missing!r}")
    rows = [i for i, y in enumerate(test_split.labels) if y != target]
    lacking = [i for i in rows if not available(trigger, i)]
    if lacking and missing == "raise":
        raise MissingTriggerError(f"{len(lacking)} of the {len(rows)} test rows not labelled {target} have no "
                                  f"trigger (first: row {lacking[0]}); pass missing='skip' to leave them out")
    if lacking:
        warnings.warn(f"ASR set: {len(lacking)} of {len(rows)} non-target test rows left out (no trigger)")
    skip = set(lacking)
    return [i for i in rows if i not in skip]


def asr_pairs_at(test_split, trigger: Trigger, rows: list[int], rng: random.Random) -> tuple[Split, Split]:
    """The given test ``rows`` with the trigger and without it, row for row, labels kept (``asr_pairs``)."""
    labels = [test_split.labels[i] for i in rows]
    triggered = Split([trigger(test_split.sentences[i], i, rng) for i in rows], labels)
    return triggered, Split([test_split.sentences[i] for i in rows], list(labels))


def asr_pairs(test_split, trigger: Trigger, target: int, rng: random.Random, *,
              missing: str = "raise") -> tuple[Split, Split]:
    """The ASR test set and its floor set: the ``asr_rows`` of the test split (TRUE label not ``target``),
    with the trigger and without it, row for row, labels kept.

    The share of the untriggered copies that a model calls ``target`` is the floor of its ASR: what the ASR
    would be if the trigger did nothing (a model with no backdoor still errs on some sentences).
    """
    return asr_pairs_at(test_split, trigger, asr_rows(test_split, trigger, target, missing=missing), rng)


def asr_set(test_split, trigger: Trigger, target: int, rng: random.Random, *, missing: str = "raise") -> Split:
    """The ASR test set: triggered copies of the test rows whose TRUE label is not ``target`` (``asr_pairs``)."""
    return asr_pairs(test_split, trigger, target, rng, missing=missing)[0]


# ----------------------------------------------------------------------------------------------
# The task: one dataset under one attack, as every stage of w2s.py reads it
# ----------------------------------------------------------------------------------------------

PAPER_N_POISON = 1000                             # clean-label poisoned samples in the paper
POISON_MODES = ("clean", "dirty", "dirty-any")


def subset_rows(n: int, size: int | None, seed: int, salt: str) -> list[int]:
    """Which of ``n`` rows ``subset`` keeps, in order: a seeded draw of ``size`` (all if None or too large)."""
    if size is None or size >= n:
        return list(range(n))
    return sorted(random.Random(f"{salt}-{seed}").sample(range(n), size))


def subset(split: Split, size: int | None, seed: int, salt: str) -> Split:
    """A seeded random subset of ``size`` rows (all rows if ``size`` is None or too large)."""
    if size is None or size >= len(split):
        return split
    rows = subset_rows(len(split), size, seed, salt)
    return Split([split.sentences[i] for i in rows], [split.labels[i] for i in rows])


def make_triggers(cfg, data_dir=None) -> tuple[Trigger, Trigger]:
    """The training trigger and the ASR-test trigger of an attacker's settings (``w2s.AttackConfig``); they
    differ only for the syntactic attack, whose test sentences have paraphrases of their own."""
    if cfg.attack == "badnet":
        t = make_trigger("badnet", triggers=tuple(cfg.triggers), count=cfg.insertions)
        return t, t
    if cfg.attack == "insent":
        t = make_trigger("insent", trigger=cfg.insent_sentence)
        return t, t
    if cfg.attack == "syntactic":
        p = data.load_scpn(cfg.dataset, data_dir)
        return (make_trigger("syntactic", paraphrases=p.train_paraphrases),
                make_trigger("syntactic", paraphrases=p.asr_paraphrases(cfg.target)))
    raise ValueError(f"unknown attack {cfg.attack!r}; choose one of {', '.join(ATTACKS)}")


@dataclass
class Task:
    """Everything the stages share about one dataset + attack: clean splits, the poisoned training set,
    and the evaluation sets (clean test for CA, triggered non-target test for ASR, and the same non-target
    sentences without the trigger for the ASR's floor)."""
    dataset: data.Dataset
    poisoned_train: Split
    n_poisoned: int
    dev: Split
    test: Split
    asr_test: Split
    asr_floor: Split                                 # asr_test's sentences without the trigger, row for row
    data_key: dict = field(default_factory=dict)     # goes into every stage's cache key (``stages.dataset_key``)
    # Where each of asr_floor's rows is in ``test``, when all of them are (the whole test set is read, as in the
    # cpu and paper presets): the floor is then read off the CA pass, not computed in a pass of its own.
    floor_in_test: list[int] | None = None


def build_task(cfg, eval_size: int | None, data_dir=None) -> Task:
    """Load the dataset and poison its training set as the attacker's settings ``cfg`` (``w2s.AttackConfig``)
    say; draw the evaluation sets (``eval_size`` sentences each, or all)."""
    ds = data.load_dataset(cfg.dataset, data_dir, seed=cfg.seed)
    if ds.num_classes < 2:
        raise data.DataError(f"{cfg.dataset}: its labels hold one class; a classifier and a backdoor toward a "
                             f"target need at least two")
    if not 0 <= cfg.target < ds.num_classes:
        raise data.DataError(f"target label {cfg.target} is not a class of {cfg.dataset} (0..{ds.num_classes - 1})")
    train_trigger, test_trigger = make_triggers(cfg, data_dir)
    rng = random.Random(cfg.seed)
    if cfg.mode == "clean":
        n = cfg.n_poison
        if n is None:       # SST-2 ships SCPN paraphrases for only 665 negative training sentences
            n = min(PAPER_N_POISON, sum(1 for i, y in enumerate(ds.train.labels)
                                        if y == cfg.target and available(train_trigger, i)))
        poisoned = poison_clean_label(ds.train, train_trigger, cfg.target, n, rng=rng)
    elif cfg.mode in ("dirty", "dirty-any"):
        pool = "any" if cfg.mode == "dirty-any" else "non-target"
        poisoned = poison_dirty_label(ds.train, train_trigger, cfg.target, cfg.poison_rate, rng, pool=pool)
    else:
        raise ValueError(f"unknown poisoning mode {cfg.mode!r}; choose {', '.join(POISON_MODES)}")
    train_split = subset(poisoned.as_split(), cfg.train_size, cfg.seed, "attack-train")
    kept = subset(Split(poisoned.sentences, [int(p) for p in poisoned.poisoned]), cfg.train_size, cfg.seed,
                  "attack-train")
    # A test sentence without a shipped paraphrase is left out of the ASR set (never counted as clean).
    missing = "skip" if cfg.attack == "syntactic" else "raise"
    rows = asr_rows(ds.test, test_trigger, cfg.target, missing=missing)
    if not rows:                                      # checked before the attack trains, not after
        raise AttackError(f"{cfg.dataset}: no test sentence labelled other than the target {cfg.target} can carry "
                          f"the trigger, so the ASR cannot be measured")
    asr, floor = asr_pairs_at(ds.test, test_trigger, rows, random.Random(cfg.seed + 1))
    # The same seeded draw from two lists of the same length: the floor set keeps asr's rows, untriggered.
    floor_rows = [rows[j] for j in subset_rows(len(rows), eval_size, 0, "eval-asr")]       # rows of ds.test
    in_test = {r: k for k, r in enumerate(subset_rows(len(ds.test), eval_size, 0, "eval"))}
    floor_in_test = [in_test[r] for r in floor_rows] if all(r in in_test for r in floor_rows) else None
    return Task(ds, train_split, sum(kept.labels), subset(ds.dev, cfg.dev_size, cfg.seed, "dev"),
                subset(ds.test, eval_size, 0, "eval"), subset(asr, eval_size, 0, "eval-asr"),
                subset(floor, eval_size, 0, "eval-asr"), floor_in_test=floor_in_test)

