"""``eval_words``: eval instances scored apart by the words their question or gold answer
says (the embedded world's ``student_unseen`` colours), validated in the run config."""

from __future__ import annotations

import numpy as np
import pytest

from cliptd.core.config import resolve_config
from cliptd.data.problems import Problem
from cliptd.tracking.table import qtype_metrics
from cliptd.training.run import mentioning


def _problem(id_, head, query, candidates=(), label=-1, answers=()):
    return Problem(key=f"{id_}:{head}", id=id_, head=head, image="x.jpg", width=8, height=8,
                   boxes=np.zeros((1, 4), np.float32), query=list(query), query_regions=[],
                   candidates=[(list(c), []) for c in candidates], label=label,
                   answers=list(answers))


def test_an_instance_mentions_a_word_through_its_question_or_gold_answer():
    problems = [
        # VCR: the gold answer says it; a distractor saying it does not count
        _problem("a", "qa", "What color is circle ?".split(),
                 [["It", "is", "red"], ["It", "is", "Orange"]], label=1),
        _problem("b", "qa", "What color is square ?".split(),
                 [["It", "is", "orange"], ["It", "is", "red"]], label=1),
        # QA→R's query holds the answer: one head suffices for the instance
        _problem("c", "qar", "How many purple things ? none".split(), [["x"]], label=0),
        # VQA: an annotator's answer
        _problem("d", "vqa", "what color is the cross ?".split(), answers=["purple", "red"]),
        _problem("e", "vqa", "what shape is the red object ?".split(), answers=["cross"]),
    ]
    assert mentioning(problems, ["orange", "PURPLE"]) == {"a", "c", "d"}
    assert mentioning(problems, ["cyan"]) == set()


@pytest.mark.parametrize("bad", [{"x": []}, {"a/b": ["w"]}, ["orange"], {"x": [1]}, {"": ["w"]}])
def test_malformed_eval_words_are_refused(bad):
    with pytest.raises(ValueError, match="eval_words"):
        resolve_config({"eval_words": bad})


def test_word_groups_are_rows_of_the_comparison():
    records = [{"metrics": {"val/id/qtype/color/q_a": 0.5, "val/id/words/unseen/q_a": 0.4,
                            "val/shift/words/unseen/q_a": 0.3}}]
    assert qtype_metrics(records, "q_a") == {
        "in-domain q_a [color]": "val/id/qtype/color/q_a",
        "in-domain q_a [words: unseen]": "val/id/words/unseen/q_a",
        "shifted q_a [words: unseen]": "val/shift/words/unseen/q_a"}
