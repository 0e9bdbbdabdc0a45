"""SentencePiece tokenizer over normalised titles and mall categories.

A small unigram vocabulary (20k pieces by default) is trained on the training titles and mall
categories; ids are padded/truncated to fixed lengths so they fit fixed queue slots.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import sentencepiece as spm

from core.text import normalize_text

__all__ = ["PAD_ID", "Tokenizer", "train_tokenizer"]

PAD_ID = 0


def train_tokenizer(texts: Iterable[str], out_path: str | Path, *, vocab_size: int = 20_000) -> Tokenizer:
    """Train a unigram model on ``texts`` and write it to ``out_path``.

    ``vocab_size`` is an upper bound: a small corpus yields fewer pieces rather than an error.
    """
    sentences = [normalize_text(text) for text in texts]
    sentences = [s for s in sentences if s]
    if not sentences:
        raise ValueError("no text to train the tokenizer on")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        model_type="unigram",
        character_coverage=0.9995,  # keeps Hangul syllables; rarer characters map to <unk>
        pad_id=PAD_ID,
        unk_id=1,
        bos_id=-1,
        eos_id=-1,
        input_sentence_size=2_000_000,
        shuffle_input_sentence=True,
        num_threads=1,
        minloglevel=2,
    )
    Path(out_path).write_bytes(model.getvalue())
    return Tokenizer(out_path)


class Tokenizer:
    """Encodes text to fixed-length id arrays (``PAD_ID`` padded)."""

    def __init__(self, model_path: str | Path):
        self._sp = spm.SentencePieceProcessor(model_file=str(model_path))

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, normalized_text: str, length: int) -> np.ndarray:
        """``(length,)`` int64 ids of already-normalised text."""
        out = np.full(length, PAD_ID, dtype=np.int64)
        if normalized_text:
            ids = self._sp.encode(normalized_text)[:length]
            out[: len(ids)] = ids
        return out

    def pieces(self, normalized_text: str) -> list[str]:
        return self._sp.encode(normalized_text, out_type=str)
