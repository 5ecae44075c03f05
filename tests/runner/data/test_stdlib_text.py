"""The stdlib text source: labelled docstrings, and the BERT runner trained on them."""

import json
import os
from collections import Counter

import pytest
from runner_helpers import ROOT

from jlora.cli import main
from jlora.runner.config import DataSection, load_config
from jlora.runner.data.stdlib_text import FAMILIES, first_paragraph, stdlib_docstrings
from jlora.runner.tasks.classification import load_examples
from runner.test_classification import overrides, tiny_bert  # noqa: F401 (tiny_bert is a fixture)

STDLIB = os.path.join(ROOT, "configs", "minilm_stdlib.yaml")


def test_every_family_has_distinct_nonempty_texts_in_sorted_order():
    data = stdlib_docstrings()
    assert list(data) == list(FAMILIES)
    for family, texts in data.items():
        assert len(texts) >= 150, f"{family}: {len(texts)} texts"  # >= 200 on CPython 3.11
        assert texts == sorted(set(texts)), family
        assert all(len(t) >= 20 and t == " ".join(t.split()) for t in texts), family
    owners = Counter(t for texts in data.values() for t in texts)
    assert max(owners.values()) == 1  # no text carries two labels
    assert stdlib_docstrings() == data


def test_signature_paragraphs_and_non_strings_are_skipped():
    assert first_paragraph("g(a, /) -> int\n\nReturn a.") == "Return a."
    assert first_paragraph("g(a)") is None
    assert first_paragraph(None) is None


def test_load_examples_is_balanced_deterministic_and_labelled():
    data = DataSection(source="stdlib", categories=("math", "files", "network"), max_per_class=50)
    texts, labels, names = load_examples(data, seed=0)
    assert names == ["files", "math", "network"]
    assert Counter(labels) == {0: 50, 1: 50, 2: 50}
    assert all(t.strip() for t in texts)
    assert load_examples(data, seed=0) == (texts, labels, names)
    assert load_examples(data, seed=1)[0] != texts
    by_family = stdlib_docstrings(["math"])["math"]
    assert all(t in by_family for t, y in zip(texts, labels, strict=True) if y == 1)


def test_unknown_family_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match=r"\['science'\] are unknown; .*among \['concurrency'"):
        load_examples(DataSection(source="stdlib", categories=("math", "science")), 0)


def test_stdlib_config_is_valid_and_names_real_families():
    cfg = load_config(STDLIB)
    assert cfg.data.source == "stdlib" and set(cfg.data.categories) <= set(FAMILIES)


def test_bert_runner_trains_on_stdlib_source(tiny_bert, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "run"
    data = ["data.source=stdlib", "data.categories=[math, files]", "data.max_per_class=12"]
    assert main(["finetune", STDLIB, *overrides(tiny_bert, run), *data]) == 0
    assert "accuracy: before" in capsys.readouterr().out
    results = json.loads((run / "results.json").read_text())
    assert 0.0 <= results["after"]["accuracy"] <= 1.0
