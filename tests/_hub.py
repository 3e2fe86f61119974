"""Tiny checkpoints in the exact layouts users download (random weights, built on the fly).

- ``visualbert_checkpoint``: as ``uclanlp/visualbert-vcr`` ships: ``config.json``
  (``model_type: visual_bert``, ``architectures: [VisualBertForMultipleChoice]``,
  ``visual_embedding_dim`` ≠ ``hidden_size``) + ``pytorch_model.bin`` with the head class's
  ``visual_bert.`` prefixed keys, and no tokenizer (those repositories use
  bert-base-uncased's: ``bert_tokenizer`` writes one in that layout).
- ``lxmert_checkpoint``: as ``unc-nlp/lxmert-base-uncased``: ``config.json`` +
  ``model.safetensors`` of ``LxmertForPreTraining`` + its WordPiece ``vocab.txt`` and
  ``tokenizer.json``.
- ``open_clip_weights``: a real open_clip architecture's state dict as a local file, what
  ``create_model(name, pretrained=<file>)`` loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SPECIALS = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def bert_tokenizer(folder: Path, words) -> int:
    """bert-base-uncased's tokenizer layout: vocab.txt, tokenizer_config.json,
    special_tokens_map.json. The vocabulary: the specials, ``words`` and every character
    with its ``##`` continuation, so WordPiece splits unknown words instead of [UNK]."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = list(dict.fromkeys(SPECIALS + sorted({w.lower() for w in words})))
    for c in "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-":
        for t in (c, f"##{c}"):
            if t not in vocab:
                vocab.append(t)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"do_lower_case": True, "model_max_length": 512, "tokenizer_class": "BertTokenizer"}))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
         "cls_token": "[CLS]", "mask_token": "[MASK]"}))
    return len(vocab)


def visualbert_checkpoint(folder: Path, vocab_size: int, *, hidden: int = 64,
                          visual_dim: int = 48, seed: int = 0) -> Path:
    from transformers import VisualBertConfig, VisualBertForMultipleChoice

    torch.manual_seed(seed)
    cfg = VisualBertConfig(vocab_size=vocab_size, hidden_size=hidden,
                           visual_embedding_dim=visual_dim, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=4 * hidden,
                           max_position_embeddings=128)
    model = VisualBertForMultipleChoice(cfg)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


def lxmert_checkpoint(folder: Path, words, *, hidden: int = 64, feat_dim: int = 40,
                      seed: int = 0) -> Path:
    from transformers import BertTokenizer, LxmertConfig, LxmertForPreTraining

    folder = Path(folder)
    vocab_size = bert_tokenizer(folder, words)
    tok = BertTokenizer(vocab=str(folder / "vocab.txt"), do_lower_case=True)
    tok.backend_tokenizer.save(str(folder / "tokenizer.json"))
    torch.manual_seed(seed)
    cfg = LxmertConfig(vocab_size=vocab_size, hidden_size=hidden, num_attention_heads=4,
                       intermediate_size=4 * hidden, l_layers=2, x_layers=1, r_layers=1,
                       visual_feat_dim=feat_dim, visual_pos_dim=4, max_position_embeddings=128,
                       num_qa_labels=7, num_object_labels=11, num_attr_labels=5)
    LxmertForPreTraining(cfg).save_pretrained(folder)  # config.json + model.safetensors
    return folder


def open_clip_weights(path: Path, name: str = "ViT-S-32-alt", seed: int = 0) -> Path:
    import open_clip

    torch.manual_seed(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(open_clip.create_model(name).state_dict(), path)
    return path
