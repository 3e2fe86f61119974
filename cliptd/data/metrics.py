"""Task metrics, computed exactly as the official evaluation code computes them.

VQA follows ``vqaEval.py`` of GT-Vision-Lab/VQA (the evaluation server's code), quirks
included, so that numbers are comparable with published ones:

- the prediction is normalized fully (whitespace, punctuation, number words, articles,
  contractions: :func:`vqa_normalize`);
- the ground-truth answers get only the punctuation step, and only when the annotators
  disagree (``len(set(answers)) > 1``);
- the period rule strips at most 32 periods (the official code passes ``re.UNICODE`` where
  ``re.sub`` expects ``count``), and its look-behind is really a look-ahead, so "a.b" loses
  its period but "3.5" keeps it.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence

# --- VQA normalization tables (data from the official vqaEval.py) ----------------------

VQA_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn’t’ve", "couldnt’ve": "couldn’t’ve",
    "didnt": "didn’t", "doesnt": "doesn’t", "dont": "don’t", "hadnt": "hadn’t",
    "hadnt’ve": "hadn’t’ve", "hadn'tve": "hadn’t’ve", "hasnt": "hasn’t", "havent": "haven’t",
    "hed": "he’d", "hed’ve": "he’d’ve", "he’dve": "he’d’ve", "hes": "he’s", "howd": "how’d",
    "howll": "how’ll", "hows": "how’s", "Id’ve": "I’d’ve", "I’dve": "I’d’ve", "Im": "I’m",
    "Ive": "I’ve", "isnt": "isn’t", "itd": "it’d", "itd’ve": "it’d’ve", "it’dve": "it’d’ve",
    "itll": "it’ll", "let’s": "let’s", "maam": "ma’am", "mightnt": "mightn’t",
    "mightnt’ve": "mightn’t’ve", "mightn’tve": "mightn’t’ve", "mightve": "might’ve",
    "mustnt": "mustn’t", "mustve": "must’ve", "neednt": "needn’t", "notve": "not’ve",
    "oclock": "o’clock", "oughtnt": "oughtn’t", "ow’s’at": "’ow’s’at", "’ows’at": "’ow’s’at",
    "’ow’sat": "’ow’s’at", "shant": "shan’t", "shed’ve": "she’d’ve", "she’dve": "she’d’ve",
    "she’s": "she’s", "shouldve": "should’ve", "shouldnt": "shouldn’t",
    "shouldnt’ve": "shouldn’t’ve", "shouldn’tve": "shouldn’t’ve", "somebody’d": "somebodyd",
    "somebodyd’ve": "somebody’d’ve", "somebody’dve": "somebody’d’ve",
    "somebodyll": "somebody’ll", "somebodys": "somebody’s", "someoned": "someone’d",
    "someoned’ve": "someone’d’ve", "someone’dve": "someone’d’ve", "someonell": "someone’ll",
    "someones": "someone’s", "somethingd": "something’d", "somethingd’ve": "something’d’ve",
    "something’dve": "something’d’ve", "somethingll": "something’ll", "thats": "that’s",
    "thered": "there’d", "thered’ve": "there’d’ve", "there’dve": "there’d’ve",
    "therere": "there’re", "theres": "there’s", "theyd": "they’d", "theyd’ve": "they’d’ve",
    "they’dve": "they’d’ve", "theyll": "they’ll", "theyre": "they’re", "theyve": "they’ve",
    "twas": "’twas", "wasnt": "wasn’t", "wed’ve": "we’d’ve", "we’dve": "we’d’ve",
    "weve": "we've", "werent": "weren’t", "whatll": "what’ll", "whatre": "what’re",
    "whats": "what’s", "whatve": "what’ve", "whens": "when’s", "whered": "where’d",
    "wheres": "where's", "whereve": "where’ve", "whod": "who’d", "whod’ve": "who’d’ve",
    "who’dve": "who’d’ve", "wholl": "who’ll", "whos": "who’s", "whove": "who've",
    "whyll": "why’ll", "whyre": "why’re", "whys": "why’s", "wont": "won’t",
    "wouldve": "would’ve", "wouldnt": "wouldn’t", "wouldnt’ve": "wouldn’t’ve",
    "wouldn’tve": "wouldn’t’ve", "yall": "y’all", "yall’ll": "y’all’ll",
    "y’allll": "y’all’ll", "yall’d’ve": "y’all’d’ve", "y’alld’ve": "y’all’d’ve",
    "y’all’dve": "y’all’d’ve", "youd": "you’d", "youd’ve": "you’d’ve",
    "you’dve": "you’d’ve", "youll": "you’ll", "youre": "you’re", "youve": "you’ve",
}  # fmt: skip
VQA_MANUAL_MAP = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
VQA_ARTICLES = frozenset({"a", "an", "the"})
VQA_PUNCT = (";", ":", "/", "'", "[", "]", '"', "(", ")", "=", "+", "\\", "_", ">", "<",
             "@", "`", ",", "?")  # fmt: skip
# Kept verbatim: "(?!<=\d)" is a negative look-ahead for the text "<=d", not a look-behind.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
_PERIOD_COUNT = int(re.UNICODE)  # the official code passes re.UNICODE (32) as `count`


def vqa_process_punctuation(text: str) -> str:
    """The official punctuation step: a mark next to a space, or any mark when the text has
    a comma inside a number ("1,000"), is deleted; otherwise it becomes a space."""
    out = text
    number_comma = _COMMA_STRIP.search(text) is not None
    for p in VQA_PUNCT:
        # The test looks at the original text, not at `out` (as the official code does).
        if p + " " in text or " " + p in text or number_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_COUNT)


def vqa_process_digit_article(text: str) -> str:
    """The official word step: lower-case, number words to digits, drop articles, then
    restore contractions ("dont" -> "don’t")."""
    words = [VQA_MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in VQA_ARTICLES]
    return " ".join(VQA_CONTRACTIONS.get(w, w) for w in words)


def vqa_normalize(answer: str) -> str:
    """Normalize an answer the way the official evaluation normalizes a prediction."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return vqa_process_digit_article(vqa_process_punctuation(answer))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official VQA accuracy of one prediction against the (10) annotator answers: the mean
    over annotators i of ``min(1, #(other annotators j != i whose answer == prediction)/3)``."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer")
    pred = vqa_normalize(prediction)
    gts = list(answers)
    if len(set(gts)) > 1:  # official: ground truth is only punctuation-processed, and only then
        gts = [vqa_process_punctuation(a) for a in gts]
    matches = sum(g == pred for g in gts)
    # Leaving annotator i out removes one match exactly when annotator i matched.
    per_annotator = [min(1.0, (matches - (g == pred)) / 3) for g in gts]
    return sum(per_annotator) / len(per_annotator)


_SOFT_SCORES = (0.0, 0.3, 0.6, 0.9, 1.0)


def vqa_soft_score(count: int) -> float:
    """Training target for an answer given by ``count`` annotators: 0, .3, .6, .9, 1."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    return _SOFT_SCORES[min(count, 4)]


# --- classification tasks ---------------------------------------------------------------


def accuracy(pred: Sequence, gold: Sequence) -> float:
    """Fraction of positions where ``pred == gold`` (SNLI-VE, VCR Q->A, QA->R)."""
    if len(pred) != len(gold):
        raise ValueError(f"{len(pred)} predictions for {len(gold)} gold labels")
    if not gold:
        raise ValueError("accuracy of an empty set")
    return sum(int(p == g) for p, g in zip(pred, gold, strict=True)) / len(gold)


def vcr_metrics(
    qa_pred: Sequence[int], qa_gold: Sequence[int], qar_pred: Sequence[int], qar_gold: Sequence[int]
) -> dict[str, float]:
    """VCR: Q->A, QA->R (rationale chosen given the gold answer) and Q->AR (both right for
    the same question). The four sequences are aligned by question."""
    n = len(qa_gold)
    if not (len(qa_pred) == len(qar_pred) == len(qar_gold) == n):
        raise ValueError("vcr_metrics needs four sequences of the same length")
    both = [
        int(a == ag and r == rg)
        for a, ag, r, rg in zip(qa_pred, qa_gold, qar_pred, qar_gold, strict=True)
    ]
    return {
        "q_a": accuracy(qa_pred, qa_gold),
        "qa_r": accuracy(qar_pred, qar_gold),
        "q_ar": sum(both) / n,
    }


def per_qtype(scores: Sequence[float], qtypes: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per question type: ``{qtype: {"score": mean per-instance score, "n": count}}``.

    ``scores`` are per-instance values (1/0 correctness, or VQA accuracies), aligned with
    ``qtypes`` (the rows' ``qtype`` column).
    """
    if len(scores) != len(qtypes):
        raise ValueError(f"{len(scores)} scores for {len(qtypes)} question types")
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for s, q in zip(scores, qtypes, strict=True):
        sums[q] += float(s)
        counts[q] += 1
    return {q: {"score": sums[q] / counts[q], "n": counts[q]} for q in sorted(counts)}
