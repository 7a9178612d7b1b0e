"""Every setting is checked before any work: a wrong option fails in one line, not in a traceback after the
attack has trained for minutes. ``w2s.py`` calls these; the experiments call them too.

Two layers: the command line's numbers are checked as they are read (the argparse types below: finite, in
range), and ``check_configs`` checks the settings a run resolves from the preset and the options together.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import attacks
import data
import defenses
import models
import registry

# The students' projections LoRA can wrap: attention, then the MLP (Llama-style gate/up/down; GPT-2's fc/proj).
LORA_TARGETS = tuple(dict.fromkeys(name for names in models.PROJECTIONS.values() for name in names))
MAX_SEED = 2**32 - 1           # every seeded generator here (torch, random, numpy) takes 0 .. 2^32 - 1
MAX_RANK = 16384               # wider than any layer of a supported student: a larger rank adds nothing
MAX_EPOCHS = 1000.0


# ----------------------------------------------------------------------------------------------
# The command line's numbers, as they are read
# ----------------------------------------------------------------------------------------------

def number(kind=float, low=None, high=None, above=None):
    """An argparse ``type``: a finite ``kind`` (int or float) in [low, high] (``above``: strictly greater)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        if above is not None and not value > above:
            raise argparse.ArgumentTypeError(f"{text} must be greater than {above}")
        if (low is not None and value < low) or (high is not None and value > high):
            span = f"{low if low is not None else '-inf'} .. {high if high is not None else 'inf'}"
            raise argparse.ArgumentTypeError(f"{text} is outside {span}")
        return value
    parse.__name__ = kind.__name__              # argparse names the type in its messages
    return parse


SEED = number(int, 0, MAX_SEED)
COUNT = number(int, 1)                         # a size, a number of blocks: at least 1
POSITIVE = number(float, above=0.0)
EPOCHS = number(float, high=MAX_EPOCHS, above=0.0)
WEIGHT = number(float, 0.0)                    # a loss weight: 0 switches its term off
FRACTION = number(float, 0.0, 1.0)


def check_numbers(a, t, u) -> None:
    """The resolved settings' numbers: finite and in range, whoever set them (a preset, an option, a script)."""
    for name, value in (("--rank", u.rank), ("--lora-alpha", u.lora_alpha), ("--epochs", u.epochs),
                        ("--attack-epochs", a.epochs), ("--teacher-epochs", t.epochs), ("--lr", u.lr),
                        ("--attack-lr", a.lr), ("--insertions", a.insertions)):
        if not math.isfinite(value) or value <= 0:
            raise SystemExit(f"error: {name} must be positive, got {value}")
    for name, value in (("--epochs", u.epochs), ("--attack-epochs", a.epochs), ("--teacher-epochs", t.epochs)):
        if value > MAX_EPOCHS:
            raise SystemExit(f"error: {name} must be at most {MAX_EPOCHS:g}, got {value}")
    if u.rank > MAX_RANK:
        raise SystemExit(f"error: --rank must be at most {MAX_RANK} (wider than any supported student), got {u.rank}")
    if a.insertions > a.max_length:            # more insertions than the tokens the student reads adds nothing
        raise SystemExit(f"error: --insertions must be at most the attacker's max length ({a.max_length} tokens), "
                         f"got {a.insertions}")
    for name, value in (("--alpha", u.alpha), ("--beta", u.beta), ("--gamma", u.gamma), ("T", u.T)):
        if not math.isfinite(value):
            raise SystemExit(f"error: {name} must be a finite number, got {value}")
    for name, value in (("--seed", a.seed), ("--unlearn-seed", u.seed)):
        if not 0 <= value <= MAX_SEED:                  # a run folder "...-seed-1" would read as seed 1
            raise SystemExit(f"error: {name} must be in 0 .. {MAX_SEED}, got {value}")


def check_writable(flag: str, folder: Path) -> None:
    """``folder`` is a folder we can write in, or one we can make: tried with a probe file in it, or in its nearest
    existing parent, before any work (permission bits alone do not say it: root ignores them, a read-only file
    system does not). Nothing is left behind."""
    if folder.exists() and not folder.is_dir():
        raise SystemExit(f"error: {flag} {folder} is a file; it must be a folder (or a path to make one)")
    existing = next(p for p in (folder.absolute(), *folder.absolute().parents) if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is a file")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise SystemExit(f"error: {flag} {folder}: cannot write in {existing} ({e.strerror or e})") from None


# ----------------------------------------------------------------------------------------------
# The resolved settings, together
# ----------------------------------------------------------------------------------------------

def check_configs(a, t, u, defense: str, data_dir) -> None:
    """Fail before any training on settings that cannot work (``a``, ``t``, ``u``: w2s's AttackConfig,
    TeacherConfig and UnlearnConfig, after the preset and the options)."""
    if a.attack not in attacks.ATTACKS:
        raise SystemExit(f"error: unknown attack {a.attack!r}; choose one of {', '.join(attacks.ATTACKS)}")
    if defense != "none" and defense not in defenses.DEFENSES:
        raise SystemExit(f"error: unknown defense {defense!r}; choose one of none, {', '.join(defenses.DEFENSES)}")
    check_numbers(a, t, u)
    if a.attack == "syntactic" and a.dataset not in data.SCPN:
        raise SystemExit(f"error: the syntactic attack needs precomputed paraphrases, shipped only for "
                         f"{', '.join(data.SCPN)}; dataset {a.dataset!r} has none")
    if a.dataset not in data.DATASETS and not Path(a.dataset).is_dir():
        raise SystemExit(f"error: unknown dataset {a.dataset!r}; choose one of {', '.join(data.DATASETS)} "
                         f"or give a folder with train.tsv, dev.tsv, test.tsv")
    if u.clean_size is not None and u.clean_size < 1:
        raise SystemExit(f"error: --clean-size must be at least 1, got {u.clean_size}")
    if not 0.0 <= a.poison_rate <= 1.0:
        raise SystemExit(f"error: --poison-rate is a share of the training set, in [0, 1]; got {a.poison_rate}")
    spec = data.DATASETS.get(a.dataset)
    if a.target < 0 or (spec is not None and a.target >= spec.num_classes):
        classes = f"0..{spec.num_classes - 1}" if spec is not None else "0 or more"
        raise SystemExit(f"error: --target {a.target} is not a class of {a.dataset} ({classes})")
    for name, value in (("--alpha", u.alpha), ("--beta", u.beta), ("--gamma", u.gamma)):
        if value < 0:
            raise SystemExit(f"error: {name} must be >= 0, got {value}")
    for name, value in (("--attack-layers", a.train_layers), ("--lora-layers", u.lora_layers),
                        ("--n-poison", a.n_poison)):
        if value is not None and value < (0 if name == "--n-poison" else 1):
            raise SystemExit(f"error: {name} must be {'>= 0' if name == '--n-poison' else 'at least 1'}, got {value}")
    unknown = [name for name in u.targets if name not in LORA_TARGETS]
    if unknown or not u.targets:
        raise SystemExit(f"error: --lora-targets {' '.join(u.targets)!r}: choose among {', '.join(LORA_TARGETS)}")
    if defense == "w2s-origin" and defenses.fa_distance(u) != "l2":
        raise SystemExit("error: --defense w2s-origin pulls the feature toward the origin, which has no direction; "
                         "it needs the L2 feature distance (--fa l2)")
    if isinstance(defenses.DEFENSES.get(defense), defenses.MuScleLoRA):      # muscle and its ablations
        check_muscle(a, u, data_dir, defense)
    if u.weights not in ("ours", "authors"):
        raise SystemExit(f"error: --weights must be 'ours' or 'authors', got {u.weights!r}")
    if not a.triggers:
        raise SystemExit("error: --triggers needs at least one word")
    if not a.insent_sentence.strip():
        raise SystemExit("error: --insent-sentence is empty; give the sentence the InSent attack inserts")
    try:
        check_student(a, u)
        check_teacher(t, defense)
    except registry.UnknownModelError as e:
        raise SystemExit(f"error: {e}") from None


# The unlearning defenses' settings, by the option that sets each: --defense muscle (and its ablations) reads
# none of them.
UNLEARNING_ONLY = {"alpha": "--alpha", "beta": "--beta", "gamma": "--gamma", "fa": "--fa", "weights": "--weights",
                   "clean_size": "--clean-size"}


def check_muscle(a, u, data_dir, defense: str = "muscle") -> None:
    """``--defense muscle`` (defenses.MuScleLoRA) or one of its ablations: the unlearning defenses' settings are
    refused, not ignored (its budget pins them, so a value other than the pinned one was given by hand), and its
    clean reference set must fit in the dev set with sentences left to select on (the dataset is read for that,
    before any training)."""
    muscle = defenses.DEFENSES[defense]
    for field_, pinned in muscle.unused.items():
        if getattr(u, field_) != pinned:
            raise SystemExit(f"error: {UNLEARNING_ONLY[field_]} is a setting of the unlearning defenses; --defense "
                             f"{defense} does not read it (MuScleLoRA trains with plain CE on the poisoned training set "
                             f"and takes its clean sentences from the dev set): drop {UNLEARNING_ONLY[field_]}")
    ds = data.load_dataset(a.dataset, data_dir, seed=a.seed)
    dev = attacks.subset(ds.dev, a.dev_size, a.seed, "dev")       # the selection dev set, as build_task draws it
    try:
        defenses.reference_split(ds, dev, muscle.ref_size, u.seed)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def check_student(a, u) -> None:
    """One of ``check_configs``'s last two, which read model files: that the student has the projections LoRA is
    asked to wrap. Reads the metadata only (seconds), so that a wrong ``--lora-targets`` fails before the attack
    trains (in ``w2s.py`` and the experiments alike), not at the first unlearning stage a quarter of an hour later."""
    style = models.decoder_style(registry.resolve_student(a.student))
    if style is None:
        return
    missing = [name for name in u.targets if name not in models.PROJECTIONS[style]]
    if missing:
        raise SystemExit(f"error: --lora-targets {' '.join(missing)}: not projections of {a.student} "
                         f"({style} blocks have {', '.join(models.PROJECTIONS[style])})")


def check_teacher(t, defense: str) -> None:
    """That the teacher a defense needs is a known name or a model folder, with its files here (or fetched now):
    otherwise a wrong ``--teacher`` would fail only after the attack has trained. The control alone needs none."""
    if any(defenses.DEFENSES[row].uses_teacher for row in defenses.rows(defense)):
        registry.resolve_teacher(t.teacher)
