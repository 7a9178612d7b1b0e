"""attacks.py: trigger insertion (count, order, both ends reachable), the poisoning modes (exactly n, labels,
seeds), the ASR set (never a target-label sample), and the syntactic trigger's refusals."""
import functools
import random
import re

import pytest
from hypothesis import given, settings, strategies as st

import attacks
import data
from attacks import AttackError, MissingTriggerError
from data import Split

# Words include the trigger words themselves: a sentence may already contain 'mn'.
WORD = st.sampled_from(["mn", "cf", "bb", "tq", "movie", "the", "I", "3D", "good", "mnx", "xmn"]) | st.text(
    alphabet="abcdefghijklmnopqrstuvwxyz'.,-", min_size=1, max_size=8)
SENTENCE_WORDS = st.lists(WORD, min_size=0, max_size=12)
SEP = st.sampled_from([" ", "  ", "\t", " \n "])
PROPS = settings(max_examples=150, deadline=None, derandomize=True)  # same examples every run: CI never flakes


def sentence_of(ws, sep=" "):
    return sep.join(ws)


def is_subsequence(small, big):
    it = iter(big)
    return all(w in it for w in small)


# ---------------------------------------------------------------------------------------------- insertion

@PROPS
@given(SENTENCE_WORDS, SEP, st.integers(1, 4), st.integers(0, 2**32))
def test_insert_trigger_count_and_order(ws, sep, count, seed):
    out = attacks.insert_trigger(sentence_of(ws, sep), "mn", random.Random(seed), count=count)
    got = out.split()
    assert got.count("mn") == ws.count("mn") + count  # whole words: 'mnx' does not count
    assert len(got) == len(ws) + count
    assert is_subsequence(ws, got)
    assert out == " ".join(got)


@PROPS
@given(st.lists(st.sampled_from(["a", "b", "film", "good", "."]), max_size=10), st.integers(0, 2**32))
def test_insent_inserts_the_phrase_whole(ws, seed):
    out = attacks.insent(" ".join(ws), random.Random(seed))
    assert out.count(attacks.INSENT) == 1
    assert out.replace(attacks.INSENT, "").split() == ws  # the other words, in order


@PROPS
@given(SENTENCE_WORDS, st.integers(1, 3), st.integers(0, 2**32))
def test_badnet_openbackdoor_triggers(ws, count, seed):
    triggers = attacks.OPENBACKDOOR_TRIGGERS
    out = attacks.badnet(" ".join(ws), random.Random(seed), triggers=triggers, count=count).split()
    before = sum(ws.count(t) for t in triggers)
    assert sum(out.count(t) for t in triggers) == before + count
    assert is_subsequence(ws, out)


@pytest.mark.parametrize("ws", [[], ["one"], ["a", "b", "c"]])
def test_every_position_is_reachable_including_both_ends(ws):
    rng = random.Random(0)
    positions = {attacks.insert_trigger(" ".join(ws), "TRIG", rng).split().index("TRIG") for _ in range(300)}
    assert positions == set(range(len(ws) + 1))


def test_user_trigger_words_and_phrases():
    for seed in range(50):  # a phrase inserted first is never split by a later insertion
        out = attacks.badnet("a b c", random.Random(seed), triggers=("zzz", "two words"), count=5)
        assert out.split().count("zzz") + out.count("two words") == 5
        assert out.replace("two words", "").split().count("zzz") == out.split().count("zzz")
        assert [w for w in out.replace("two words", "").split() if w != "zzz"] == ["a", "b", "c"]
    with pytest.raises(ValueError):
        attacks.insert_trigger("a b", "  ", random.Random(0))
    with pytest.raises(ValueError):
        attacks.make_trigger("badnet", triggers="mn")  # a string, not a tuple of words


def test_addsent_option():
    t = attacks.make_trigger("insent", trigger=attacks.ADDSENT)
    assert attacks.ADDSENT in t("a b", 0, random.Random(0))


def test_make_trigger_unknown_lists_choices():
    with pytest.raises(ValueError) as e:
        attacks.make_trigger("stylebkd")
    assert all(a in str(e.value) for a in attacks.ATTACKS)


# ---------------------------------------------------------------------------------------------- syntactic

def test_syntactic_missing_paraphrase_raises():
    t = attacks.make_trigger("syntactic", paraphrases={3: "when it rains , it pours ."})
    assert t("it rains and pours", 3, random.Random(0)) == "when it rains , it pours ."
    assert t.available(3) and not t.available(4)
    with pytest.raises(MissingTriggerError, match="row 4 has no precomputed paraphrase"):
        t("some sentence", 4, random.Random(0))
    with pytest.raises(KeyError):
        t("some sentence", 4, random.Random(0))


def test_syntactic_identical_paraphrase_raises():
    t = attacks.make_trigger("syntactic", paraphrases={0: "if you love it , you love it ."})
    with pytest.raises(AttackError, match="equals the clean sentence"):
        t("if you love it ,  you love it .", 0, random.Random(0))


def test_syntactic_needs_paraphrases():
    with pytest.raises(AttackError, match="load_scpn"):
        attacks.make_trigger("syntactic")


def test_clean_label_with_paraphrases_picks_first_rows_that_have_one():
    split = Split([f"s{i}" for i in range(10)], [0, 0, 1, 0, 0, 1, 0, 0, 0, 1])
    t = attacks.make_trigger("syntactic", paraphrases={i: f"when p{i} ," for i in (1, 2, 4, 7, 8)})
    out = attacks.poison_clean_label(split, t, target=0, n=3, rng=random.Random(0))
    assert [i for i, p in enumerate(out.poisoned) if p] == [1, 4, 7]
    assert out.sentences[4] == "when p4 ," and out.labels == split.labels
    with pytest.raises(AttackError, match=r"only 4 exist \(3 of the 7 lack a trigger\)"):
        attacks.poison_clean_label(split, t, target=0, n=5, rng=random.Random(0))


# ---------------------------------------------------------------------------------------------- poisoning

def make_split(labels):
    return Split([f"sentence {i} mn" if i % 3 == 0 else f"sentence {i}" for i in range(len(labels))], labels)


LABELS = st.lists(st.integers(0, 2), min_size=0, max_size=60)


@PROPS
@given(LABELS, st.integers(0, 2), st.integers(0, 40), st.integers(0, 2**32))
def test_clean_label_poisons_exactly_the_first_n_target_rows(labels, target, n, seed):
    split, trigger = make_split(labels), attacks.make_trigger("badnet")
    targets = [i for i, y in enumerate(labels) if y == target]
    if n > len(targets):
        with pytest.raises(AttackError, match=f"only {len(targets)} exist"):
            attacks.poison_clean_label(split, trigger, target, n, rng=random.Random(seed))
        return
    out = attacks.poison_clean_label(split, trigger, target, n, rng=random.Random(seed))
    assert [i for i, p in enumerate(out.poisoned) if p] == targets[:n]
    assert out.labels == labels  # clean-label: no label changes
    for i, (before, after) in enumerate(zip(split.sentences, out.sentences)):
        extra = after.split().count("mn") - before.split().count("mn")
        assert extra == (1 if out.poisoned[i] else 0)
    assert out == attacks.poison_clean_label(split, trigger, target, n, rng=random.Random(seed))


@PROPS
@given(LABELS, st.integers(0, 2), st.floats(0, 1), st.integers(0, 2**32), st.sampled_from(["non-target", "any"]))
def test_dirty_label_relabels_random_rows_of_its_pool(labels, target, rate, seed, pool):
    split, trigger = make_split(labels), attacks.make_trigger("insent")
    k = round(rate * len(labels))
    rows_of_pool = [i for i, y in enumerate(labels) if pool == "any" or y != target]
    if k > len(rows_of_pool):
        with pytest.raises(AttackError, match=f"only {len(rows_of_pool)} exist"):
            attacks.poison_dirty_label(split, trigger, target, rate, random.Random(seed), pool=pool)
        return
    out = attacks.poison_dirty_label(split, trigger, target, rate, random.Random(seed), pool=pool)
    rows = [i for i, p in enumerate(out.poisoned) if p]
    assert len(rows) == k and set(rows) <= set(rows_of_pool)
    for i in range(len(labels)):
        assert out.labels[i] == (target if out.poisoned[i] else labels[i])
        assert (attacks.INSENT in out.sentences[i]) == out.poisoned[i]
    assert out == attacks.poison_dirty_label(split, trigger, target, rate, random.Random(seed), pool=pool)


def test_dirty_label_any_pool_triggers_target_rows_too_and_only_triggerable_ones():
    # 6 rows, labels 0 1 0 1 0 1, target 0; rows 1 and 4 have no paraphrase. Rate 4/6 with pool "any" must take
    # all four triggerable rows {0, 2, 3, 5}: rows 0 and 2 keep label 0, rows 3 and 5 are relabelled 0.
    split = make_split([0, 1, 0, 1, 0, 1])
    trigger = attacks.make_trigger("syntactic", paraphrases={0: "p0", 2: "p2", 3: "p3", 5: "p5"})
    out = attacks.poison_dirty_label(split, trigger, 0, 4 / 6, random.Random(0), pool="any")
    assert out.poisoned == [True, False, True, True, False, True]
    assert out.labels == [0, 1, 0, 0, 0, 0]
    assert out.sentences[0] == "p0" and out.sentences[5] == "p5" and out.sentences[1] == split.sentences[1]
    with pytest.raises(AttackError, match="needs 5 rows that can be triggered; only 4 exist"):
        attacks.poison_dirty_label(split, trigger, 0, 5 / 6, random.Random(0), pool="any")
    with pytest.raises(ValueError, match="pool must be"):
        attacks.poison_dirty_label(split, trigger, 0, 0.5, random.Random(0), pool="target")


def test_same_seed_same_poisoned_set_different_seed_differs():
    split = make_split([i % 2 for i in range(200)])
    trigger = attacks.make_trigger("badnet")
    a = attacks.poison_dirty_label(split, trigger, 0, 0.2, random.Random(7))
    assert a == attacks.poison_dirty_label(split, trigger, 0, 0.2, random.Random(7))
    assert a.poisoned != attacks.poison_dirty_label(split, trigger, 0, 0.2, random.Random(8)).poisoned


@PROPS
@given(LABELS, st.integers(0, 2), st.sampled_from(attacks.ATTACKS[:2]), st.integers(0, 2**32))
def test_asr_set_has_no_target_label_sample(labels, target, attack, seed):
    split = make_split(labels)
    asr = attacks.asr_set(split, attacks.make_trigger(attack), target, random.Random(seed))
    assert target not in asr.labels
    assert asr.labels == [y for y in labels if y != target]  # true labels, kept
    assert len(asr) == sum(y != target for y in labels)


def test_asr_set_with_missing_paraphrases_raises_or_skips_loudly():
    split = Split(["a", "b", "c", "d"], [0, 1, 1, 0])
    t = attacks.make_trigger("syntactic", paraphrases={1: "when b ,"})
    with pytest.raises(MissingTriggerError, match="1 of the 2 test rows"):
        attacks.asr_set(split, t, 0, random.Random(0))
    with pytest.warns(UserWarning, match="1 of 2"):
        asr = attacks.asr_set(split, t, 0, random.Random(0), missing="skip")
    assert asr == Split(["when b ,"], [1])


def test_asr_pairs_are_the_same_rows_with_and_without_the_trigger():
    split = Split(["a b", "c d", "e f", "g h"], [0, 1, 1, 0])
    triggered, untriggered = attacks.asr_pairs(split, attacks.make_trigger("badnet"), 0, random.Random(3))
    assert untriggered == Split(["c d", "e f"], [1, 1])            # the non-target rows, as they are
    assert triggered == attacks.asr_set(split, attacks.make_trigger("badnet"), 0, random.Random(3))
    assert attacks.asr_rows(split, attacks.make_trigger("badnet"), 0) == [1, 2]
    for t, u in zip(triggered.sentences, untriggered.sentences):
        assert sorted(t.split()) == sorted(u.split() + ["mn"])
    t = attacks.make_trigger("syntactic", paraphrases={1: "when c d ,"})
    with pytest.warns(UserWarning, match="1 of 2"):                # a row left out of one is left out of both
        assert attacks.asr_pairs(split, t, 0, random.Random(0), missing="skip") == (
            Split(["when c d ,"], [1]), Split(["c d"], [1]))
    with pytest.warns(UserWarning, match="1 of 2"):
        assert attacks.asr_rows(split, t, 0, missing="skip") == [1]


def test_plain_function_is_a_trigger():
    def shout(sentence, index, rng):
        return sentence.upper()
    out = attacks.poison_clean_label(Split(["a", "b"], [0, 0]), shout, 0, 1, rng=random.Random(0))
    assert out.sentences == ["A", "b"]


# ---------------------------------------------------------------------------------------------- real data

from conftest import needs_data  # noqa: E402


@functools.lru_cache(maxsize=None)
def shipped(name):
    return data.load_dataset(name), data.load_scpn(name)


@needs_data
def test_sst2_badnet_paper_setting():
    ds, _ = shipped("sst2")
    out = attacks.poison_clean_label(ds.train, attacks.make_trigger("badnet"), 0, 1000, rng=random.Random(0))
    assert sum(out.poisoned) == 1000 and out.labels == ds.train.labels
    assert all(re.search(r"(^| )mn( |$)", s) for s, p in zip(out.sentences, out.poisoned) if p)
    asr = attacks.asr_set(ds.test, attacks.make_trigger("badnet"), 0, random.Random(0))
    assert len(asr) == 909 and set(asr.labels) == {1}


@needs_data
def test_sst2_syntactic_has_too_few_negative_paraphrases_for_1000():
    ds, p = shipped("sst2")
    t = attacks.make_trigger("syntactic", paraphrases=p.train_paraphrases)
    with pytest.raises(AttackError, match="only 665 exist"):
        attacks.poison_clean_label(ds.train, t, 0, 1000, rng=random.Random(0))
    out = attacks.poison_clean_label(ds.train, t, 1, 700, rng=random.Random(0))
    assert sum(out.poisoned) == 700


@needs_data
def test_sst2_syntactic_asr_sets():
    ds, p = shipped("sst2")
    for target, size in [(0, 908), (1, 911)]:
        t = attacks.make_trigger("syntactic", paraphrases=p.asr_paraphrases(target))
        with pytest.raises(MissingTriggerError):
            attacks.asr_set(ds.test, t, target, random.Random(0))
        with pytest.warns(UserWarning):
            asr = attacks.asr_set(ds.test, t, target, random.Random(0), missing="skip")
        assert len(asr) == size and target not in asr.labels


@needs_data
def test_olid_syntactic_target_0():
    ds, p = shipped("olid")
    t = attacks.make_trigger("syntactic", paraphrases=p.train_paraphrases)
    out = attacks.poison_clean_label(ds.train, t, 0, 1000, rng=random.Random(0))
    assert sum(out.poisoned) == 1000
    assert all(s != c for s, c, q in zip(out.sentences, ds.train.sentences, out.poisoned) if q)
