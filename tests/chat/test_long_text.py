"""Long texts are tokenised in pieces (so that a server's other threads run meanwhile): the pieces'
ids are exactly the whole text's, whatever mix of letters, digits, CJK, spaces, newlines,
punctuation and special tokens the text holds."""
import random
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv32.chat import Tokenizer
from dsv32.chat.tokenizer import LONG_TEXT, long_text_pieces

PARTS = ["hello", " world", " a", "b ", "Ab", "你好", "中文字", "こんにちは", "🤗", "\n", "\n\n", " \n", "\r\n",
         "  ", "   ", "\t", "é", "Ж", "1", "23", "456", "7890", ".", "!\n", "'s", "-x", "<｜User｜>", "<think>",
         "</think>", "<｜end▁of▁sentence｜>", "<｜DSML｜", "x", " ", "A"]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.load()


def whole(tok, text):
    return tok.backend.encode(text, add_special_tokens=False).ids


@settings(max_examples=40, deadline=None)
@given(parts=st.lists(st.sampled_from(PARTS), max_size=400), size=st.integers(1, 60))
def test_pieces_tokenise_like_the_whole(tok, parts, size):
    text = "".join(parts)
    pieces = long_text_pieces(text, size)
    assert "".join(pieces) == text and all(pieces[:-1])
    assert [i for p in pieces for i in whole(tok, p)] == whole(tok, text)


def test_encode_of_a_long_text(tok):
    rng = random.Random(0)
    text = "".join(rng.choice(PARTS) for _ in range(60_000))
    assert len(text) > 2 * LONG_TEXT and len(long_text_pieces(text)) > 2
    assert tok.encode(text) == whole(tok, text)
    assert tok.encode(text, add_bos=True) == [tok.bos_id] + whole(tok, text)
    assert long_text_pieces("7" * (3 * LONG_TEXT)) == ["7" * (3 * LONG_TEXT)]    # no safe cut: one piece


def test_other_threads_run_while_a_long_text_is_encoded(tok):
    text = "hello world, how are you? " * 100_000             # 2.6 MB
    worker = threading.Thread(target=tok.encode, args=(text,))
    worker.start()
    stalls = []
    while worker.is_alive():
        t0 = time.perf_counter()
        time.sleep(0.005)
        stalls.append(time.perf_counter() - t0)
    assert len(stalls) > 10 and max(stalls) < 0.3, sorted(stalls)[-3:]
