"""The output's text as the engine streams it (`DecodeStream`) equals a full decode of the tokens so far, at every
flush, for the decoders of the common checkpoint families: byte-level BPE (Qwen, DeepSeek; the bundled model's),
SentencePiece's Metaspace, Llama-2's byte fallback, and WordPiece."""

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer, decoders, models

from mixjax.tokenizer import DecodeStream, Tokenizer

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "mixjax" / "default_model"


class _Raw:
    """A `tokenizers` tokenizer behind the one method DecodeStream calls."""

    def __init__(self, tok):
        self.tok = tok

    def decode(self, ids, skip_special_tokens: bool = True):
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


def _word_level(tokens: list[str], decoder) -> _Raw:
    tok = HFTokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=tokens[0]))
    tok.decoder = decoder
    return _Raw(tok)


def assert_streams_as_full_decode(tok, ids: list[int], flush_sizes):
    """Flush after each of flush_sizes new tokens (cycled): every flush's text is the full decode of the ids so far."""
    stream, i, k = DecodeStream(tok), 0, 0
    while i < len(ids):
        i = min(len(ids), i + flush_sizes[k % len(flush_sizes)])
        k += 1
        assert stream.decode(ids[:i]) == tok.decode(ids[:i]), f"after {i} of {ids}"


def test_byte_level_bpe_random_ids_and_text():
    """Random ids (characters split across tokens, bytes that are no UTF-8 at all) and the tokens of texts with
    multi-byte characters, flushed 1 to 8 tokens at a time."""
    tok = Tokenizer(DEFAULT_MODEL)
    rng = np.random.RandomState(0)
    for _ in range(200):
        ids = rng.randint(0, tok.vocab_size, rng.randint(1, 60)).tolist()
        assert_streams_as_full_decode(tok, ids, rng.randint(1, 9, 5).tolist())
    for text in ["héllo wörld, ünïcode ✓ 日本語のテキスト 🚀🚀 done", "  spaces   and\nnew lines\t tabs."]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        for step in (1, 3, 8):
            assert_streams_as_full_decode(tok, ids, [step])


@pytest.mark.parametrize("family", ["metaspace", "llama2-byte-fallback", "wordpiece"])
def test_other_decoders(family):
    """Decoders that treat a word's first token apart (SentencePiece drops the text's leading space, WordPiece joins
    '##' pieces): a window's text is taken past a token before the new ones, so the stream still equals the full
    decode."""
    if family == "metaspace":
        tok = _word_level(["<unk>", "▁Hello", "▁world", "!", "▁", "ing", "▁play"], decoders.Metaspace())
    elif family == "llama2-byte-fallback":
        pieces = ["<unk>", "▁Hello", "▁world", "▁", "!"] + [f"<0x{b:02X}>" for b in "é🚀".encode()]
        tok = _word_level(pieces, decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)]))
    else:
        tok = _word_level(["[UNK]", "play", "##ing", "the", "game", "##s", ".", "un", "##believ", "##able"],
                          decoders.WordPiece())
    n = len(tok.tok.get_vocab())
    rng = np.random.RandomState(1)
    for _ in range(100):
        ids = rng.randint(1, n, rng.randint(1, 30)).tolist()
        assert_streams_as_full_decode(tok, ids, rng.randint(1, 5, 4).tolist())


def test_cost_does_not_grow_with_the_output():
    """Each flush decodes a window of the last tokens, not the whole output: counted in tokens decoded."""
    tok = Tokenizer(DEFAULT_MODEL)
    decoded = []

    class Counting:
        def decode(self, ids, skip_special_tokens=True):
            decoded.append(len(ids))
            return tok.decode(ids, skip_special_tokens)

    ids = tok.encode("one two three four five six seven eight nine ten " * 40)
    stream = DecodeStream(Counting())
    for i in range(8, len(ids) + 1, 8):
        assert stream.decode(ids[:i]) == tok.decode(ids[:i])
    assert len(ids) > 400 and max(decoded) <= 16
