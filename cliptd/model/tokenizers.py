"""Student tokenizers: a pretrained checkpoint's own (WordPiece, from its folder or a
separate tokenizer folder), or, for students trained here, a word-level BERT-style one over
a closed vocabulary."""

from __future__ import annotations

from pathlib import Path

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


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


def load_checkpoint_tokenizer(folder: Path, tokenizer_dir: Path | None = None,
                              vocab_size: int | None = None):
    """The tokenizer a pretrained checkpoint was trained with: from ``tokenizer_dir``, else
    from the checkpoint folder itself. A folder with no tokenizer files is refused (loading
    one anyway gives a tokenizer of 5 special tokens that maps every word to [UNK]), and so
    is a vocabulary larger than the checkpoint's embedding table."""
    from transformers import AutoTokenizer, BertTokenizerFast

    where = Path(tokenizer_dir or folder)
    if not where.is_dir():
        raise ValueError(f"{where}: no such tokenizer folder")
    if not any((where / f).exists() for f in TOKENIZER_FILES):
        hint = "" if tokenizer_dir else (
            "; pass --tokenizer DIR (the uclanlp VisualBERT checkpoints ship none: they use "
            "bert-base-uncased's)")
        raise ValueError(f"{where}: no tokenizer ({' or '.join(TOKENIZER_FILES)}){hint}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError) as exc:
        if not (where / "vocab.txt").exists():
            raise ValueError(f"{where}: tokenizer does not load ({exc})") from None
        # a bare WordPiece vocab.txt (no tokenizer_class to go by): BERT's tokenizer
        tokenizer = BertTokenizerFast.from_pretrained(where)
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise ValueError(f"{where}: tokenizer has {len(tokenizer)} tokens, more than the "
                         f"checkpoint's vocab_size {vocab_size}: not its tokenizer")
    return tokenizer
