"""Tokenizers of students without their own: a word-level BERT-style one over a closed vocabulary."""

from __future__ import annotations

from transformers import (
    PreTrainedTokenizerFast,
)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_word_tokenizer(words, max_length: int = 64) -> PreTrainedTokenizerFast:
    """A word-level BERT-style tokenizer over a closed vocabulary (the synthetic world's).

    Real students bring their own WordPiece tokenizer in their checkpoint folder.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for w in sorted({w.lower() for w in words}):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[(t, vocab[t]) for t in ("[CLS]", "[SEP]")])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_max_length=max_length)
