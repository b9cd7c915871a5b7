"""The server's reply text, grown a few ids at a time, equals decoding every generated id at every
step: for the byte-level BPE of SmolLM2 (characters split across ids, tokens with and without a
leading space) and the WordPiece of MiniLM (``##`` pieces, clean-up of spaces before punctuation),
on real text in several scripts and on random ids."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings
from transformers import AutoTokenizer

from deltatune.serving.decoding import IncrementalText, TextStream
from tiny_assets import session_assets

TEXTS = [
    "Hello, world! It's a test: don't stop.",
    "Grüße aus Köln — naïve café, 東京タワー、日本語のテキスト。",
    "Emoji 🤗🚀 and 👩‍👩‍👧 families, ✓ marks, Ελληνικά, русский, עברית, 한국어.",
    "  leading spaces,\ttabs\nand new lines\n\n  indented",
    "def f(x):\n    return x ** 2  # squares",
]


@pytest.fixture(scope="module", params=["llama", "bert"])
def tokenizer(request, tmp_path_factory):
    assets = session_assets(tmp_path_factory)
    return AutoTokenizer.from_pretrained(str(getattr(assets, request.param)))


def check_every_step(tokenizer, ids: list[int]) -> None:
    text = IncrementalText(tokenizer)
    for n, token in enumerate(ids, start=1):
        assert text.add(token) == tokenizer.decode(ids[:n], skip_special_tokens=True), ids[:n]


@pytest.mark.parametrize("sample", TEXTS)
def test_real_text_grows_as_a_full_decode_does(tokenizer, sample):
    check_every_step(tokenizer, tokenizer(sample, add_special_tokens=False)["input_ids"])


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_random_ids_grow_as_a_full_decode_does(tokenizer, data):
    ids = data.draw(st.lists(st.integers(0, len(tokenizer) - 1), max_size=40))
    check_every_step(tokenizer, ids)


def test_a_stream_sends_the_whole_reply_once_in_whole_characters(tokenizer):
    ids = tokenizer(TEXTS[2], add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer)
    pieces = [stream.add(token) for token in ids] + [stream.flush()]
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in piece for piece in pieces)
