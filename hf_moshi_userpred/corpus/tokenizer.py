"""A small sentencepiece text tokenizer trained on a corpus' own words, with Moshi's special ids.

    Path("tokenizer.model").write_bytes(train_tokenizer(lines, vocab_size=200, seed=0))
"""

from __future__ import annotations

import io

import sentencepiece as spm


def train_tokenizer(lines: list[str], vocab_size: int, seed: int) -> bytes:
    """A BPE sentencepiece model with Moshi's special ids (unk 0, bos 1, eos 2, pad 3), serialized."""
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        normalization_rule_name="identity",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()



__all__ = ["train_tokenizer"]
