"""The sentence sets of xla_qops.data: sizes, disjointness, and that the natural
sets share nothing with the templates of scripts/make_sentences.py."""

import importlib.util
import itertools
import pathlib
import re

import pytest

from xla_qops import data

ROOT = pathlib.Path(__file__).resolve().parent.parent
NATURAL = ("natural_calibration", "natural_evaluation")
TEMPLATED = ("calibration", "evaluation")
SIZES = {"calibration": 400, "evaluation": 200, "natural_calibration": 400,
         "natural_evaluation": 300}  # at least


def _words(sentence):
    return re.findall(r"[a-z0-9']+", sentence.lower())


def _templates():
    path = ROOT / "scripts" / "make_sentences.py"
    if not path.exists():
        pytest.skip("scripts/make_sentences.py is not in this checkout")
    spec = importlib.util.spec_from_file_location("make_sentences", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_kind_loads_and_unknown_kinds_are_refused():
    assert set(data.KINDS) == set(NATURAL) | set(TEMPLATED)
    for kind in data.KINDS:
        lines = data.sentences(kind)
        assert len(lines) >= SIZES[kind], kind
        assert all(line == line.strip() and line for line in lines), kind
    with pytest.raises(ValueError, match="natural_evaluation"):
        data.sentences("natural")


@pytest.mark.parametrize("kind", NATURAL)
def test_natural_set_files_are_utf8_one_sentence_a_line(kind):
    raw = (pathlib.Path(data.__file__).with_name(f"{kind}_sentences.txt")).read_bytes()
    text = raw.decode("utf-8")
    assert text.endswith("\n") and "\r" not in text and "\n\n" not in text
    assert text.splitlines() == data.sentences(kind)


def test_no_sentence_twice_and_the_sets_are_disjoint():
    seen = {}
    for kind in data.KINDS:
        for sentence in data.sentences(kind):
            key = " ".join(_words(sentence))
            assert key not in seen, (sentence, kind, seen.get(key))
            seen[key] = kind


def test_natural_sets_have_no_near_duplicates():
    """No two natural sentences (within a set or across the two) share more than
    half of their distinct words (Jaccard)."""
    items = [(kind, s, set(_words(s))) for kind in NATURAL for s in data.sentences(kind)]
    close = [(a, b) for (_, a, wa), (_, b, wb) in itertools.combinations(items, 2)
             if len(wa & wb) > 0.5 * len(wa | wb)]
    assert not close, close[:5]


@pytest.mark.parametrize("kind", NATURAL)
def test_natural_sets_vary_in_length(kind):
    lengths = [len(s.split()) for s in data.sentences(kind)]
    assert min(lengths) >= 3
    assert sum(n <= 6 for n in lengths) >= 10  # short lines ...
    assert sum(n >= 30 for n in lengths) >= 8  # ... and long ones
    assert max(lengths) >= 40


def test_natural_sets_match_no_template():
    """No natural sentence contains a template's subject, object, time phrase or
    fact, or has the shape of one of its opinion or question frames."""
    m = _templates()
    alternatives = {"t": m.TOPICS, "o": m.OBJECTS, "v": m.VERBS, "time": m.TIMES}

    def frame(template):
        parts = re.split(r"\{(\w+)\}", template)
        return re.compile("".join(
            re.escape(p) if i % 2 == 0 else "(?:" + "|".join(map(re.escape, alternatives[p])) + ")"
            for i, p in enumerate(parts)), re.IGNORECASE)

    frames = [frame(t) for t in m.OPINIONS + m.QUESTIONS]
    frames.append(re.compile("(?:" + "|".join(map(re.escape, m.SUBJECTS)) + ") (?:"
                             + "|".join(m.VERBS) + ") ", re.IGNORECASE))
    phrases = [re.compile(r"\b" + re.escape(p) + r"\b", re.IGNORECASE)
               for p in m.SUBJECTS + m.OBJECTS + m.TIMES]
    for kind in NATURAL:
        for s in data.sentences(kind):
            assert not any(f.lower() in s.lower() for f in m.FACTS), s
            assert not any(p.search(s) for p in phrases), s
            assert not any(f.fullmatch(s) or f.match(s) for f in frames), s


def test_natural_sets_share_few_word_sequences_with_the_templated_sets():
    """At most 1% of the natural sentences share any 4-word sequence with a
    templated sentence (common English such as "at the end of" is allowed)."""
    def grams(sentence):
        w = _words(sentence)
        return {tuple(w[i:i + 4]) for i in range(len(w) - 3)}

    templated = set().union(*(grams(s) for kind in TEMPLATED for s in data.sentences(kind)))
    natural = [s for kind in NATURAL for s in data.sentences(kind)]
    sharing = [s for s in natural if grams(s) & templated]
    assert len(sharing) <= 0.01 * len(natural), sharing


def test_the_two_natural_sets_are_different_mixes():
    """Calibration leans on recipes, instructions, history and code comments;
    evaluation on news, questions and chat: their vocabularies differ more than
    two samples of one set do."""
    def vocabulary(lines):
        return {w for s in lines for w in _words(s)}

    def overlap(a, b):  # Jaccard of two samples' vocabularies
        return len(vocabulary(a) & vocabulary(b)) / len(vocabulary(a) | vocabulary(b))

    cal, ev = data.sentences("natural_calibration"), data.sentences("natural_evaluation")
    n = 2 * (min(len(cal), len(ev)) // 2)  # four samples of n / 2 sentences
    within = min(overlap(cal[:n:2], cal[1:n:2]), overlap(ev[:n:2], ev[1:n:2]))
    across = max(overlap(cal[:n:2], ev[:n:2]), overlap(cal[1:n:2], ev[1:n:2]))
    assert across < 0.95 * within  # measured: 0.174 against 0.199
    # a few markers of each mix
    assert sum(s.startswith(("#", "//")) for s in cal) >= 10
    assert sum(s.endswith("?") for s in ev) >= 60
    assert sum(bool(re.search(r"\d", s)) for s in ev) >= 60


def test_sentence_files_ship_in_the_wheel():
    """scikit-build-core's wheel.packages copies the whole package directory, the
    .txt files included."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["scikit-build"]
    assert "xla_qops" in config["wheel"]["packages"]
    assert not any(pattern.endswith(".txt") for pattern in config["wheel"].get("exclude", []))
    for kind in data.KINDS:
        assert (ROOT / "xla_qops" / "data" / f"{kind}_sentences.txt").exists()
