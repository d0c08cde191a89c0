"""Grammar-constrained decoding in the engine: a request's grammar (`dsv32.chat.grammar`) compiled
with llguidance into a logits processor that each sequence clones.

llguidance runs on the CPU (a Rust core), computes a mask over DeepSeek's 129k vocabulary in about
0.1 ms in the usual case, and takes Lark-like grammars with JSON schemas and special tokens inside.
xgrammar keeps special tokens outside its grammars (the `</think>` switch would need code around
it); outlines-core turns schemas into regular expressions (no recursive schemas, no markup).

Contract: the sampler calls a processor with the ids generated so far and the fp32 logits [V] of the
next token; the processor feeds the new ids to its matcher and sets every token the grammar refuses
to -inf, ids past the tokenizer included. If a token outside the grammar was sampled anyway (a
logit_bias or min_tokens pushing past the mask), the output can no longer be valid: the processor
then allows only the end of sentence. MTP drafts need nothing more: a draft is kept only when it
equals the token sampled under the mask, so a draft the grammar refuses is never accepted.

Cost: the llguidance view of the tokenizer (about a second) is built once per compiler; a grammar
is compiled once (a few ms; 0.2 s for 128 strict tools) and cached by its text; each sequence gets
a copy of the compiled matcher (`bench/grammar.py` measures the cost per decode step).
"""
from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from dataclasses import replace

import llguidance
import numpy as np
import torch

from dsv32.chat.grammar import Grammar, OutputSpec, functions, request_grammar

log = logging.getLogger("dsv32.engine")


def _error_message(error: str, grammar: Grammar) -> str:
    """llguidance's error on one line, without its grammar listing, prefixed by the request field."""
    lines = []
    for line in error.strip().splitlines():
        if re.match(r"\s*\d+ \|", line):     # the listing of the grammar source starts here
            break
        if line.strip() and set(line.strip()) != {"^"}:
            lines.append(line.strip())
    text = " ".join(lines) or "invalid grammar"
    match = re.match(r"at (\d+)\(\d+\): (.*)", text)
    if not match:
        return text
    where = grammar.where(int(match.group(1)))
    message = match.group(2).replace("failed to compile JSON schema: ", "")
    return f"{where}: {message}" if where else message


def _tool_index(message: str) -> int | None:
    """The i of a `tools[i]...` error message."""
    match = re.match(r"tools\[(\d+)\]", message)
    return int(match.group(1)) if match else None


class GrammarCompiler:
    """Turns a request's `OutputSpec` into logits processors for one tokenizer (compiled grammars
    are cached by their text)."""

    def __init__(self, tokenizer, vocab_size: int, cache_size: int = 128):
        self.tokenizer = tokenizer
        self.n_vocab = max(vocab_size, tokenizer.vocab_size)
        self.cache_size = cache_size
        self._llt: llguidance.LLTokenizer | None = None
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def processors(self, spec: OutputSpec, safety_net: bool = True) -> list:
        """[] when nothing is constrained, else one processor to clone per sequence. ValueError
        (an HTTP 400) for invalid schemas, tools or tool_choice. A non-strict tool whose schema
        cannot be compiled has its arguments left free (logged), as `strict` was not asked for."""
        strict = {i for i, (_, is_strict) in enumerate(functions(spec.tools)) if is_strict}
        while True:
            try:
                grammar = request_grammar(spec, self.tokenizer.think_end_id, safety_net)
                if grammar is None:
                    return []
                matcher = self.compile(grammar)
            except ValueError as exc:
                i = _tool_index(str(exc))
                if i is None or i in strict or i in spec.unchecked:
                    raise
                log.warning("tool %d's parameters cannot be enforced (%s): its arguments stay free", i, exc)
                spec = replace(spec, unchecked=spec.unchecked | {i})
                continue
            return [GrammarLogitsProcessor(matcher, self.n_vocab, self.tokenizer.eos_id)]

    def tokenizer_view(self) -> llguidance.LLTokenizer:
        """The llguidance view of the tokenizer (built on first use, about a second)."""
        with self._lock:
            if self._llt is None:
                self._llt = llguidance.LLTokenizer(self.tokenizer.backend.to_str(), n_vocab=self.n_vocab,
                                                   eos_token=self.tokenizer.eos_id)
            return self._llt

    def compile(self, grammar: Grammar) -> llguidance.LLMatcher:
        """A matcher for `grammar` in its initial state, shared: copy it, never advance it.
        ValueError when the grammar is invalid."""
        llt, key = self.tokenizer_view(), grammar.text
        with self._lock:
            template = self._compiled.get(key)
            if template is not None:
                self._compiled.move_to_end(key)
                return template
        text = llguidance.LLMatcher.grammar_from_lark(grammar.text)
        error = llguidance.LLMatcher.validate_grammar(text, llt)
        if error:
            raise ValueError(_error_message(error, grammar))
        template = llguidance.LLMatcher(llt, text, log_level=0)
        if template.is_error():
            raise ValueError(_error_message(template.get_error(), grammar))
        with self._lock:
            self._compiled[key] = template
            while len(self._compiled) > self.cache_size:
                self._compiled.popitem(last=False)
        return template


class GrammarLogitsProcessor:
    """Masks one sequence's logits to the tokens its grammar allows next; `clone()` per sequence."""

    def __init__(self, matcher: llguidance.LLMatcher, n_vocab: int, eos_id: int):
        self._template = matcher
        self._matcher = matcher.deep_copy()
        self.n_vocab, self.eos_id = n_vocab, eos_id
        self._words = np.zeros((n_vocab + 31) // 32, dtype=np.int32)
        self._consumed = 0
        self._warned = False

    def clone(self) -> "GrammarLogitsProcessor":
        return GrammarLogitsProcessor(self._template, self.n_vocab, self.eos_id)

    @property
    def is_accepting(self) -> bool:
        """Whether the text so far is a complete answer (end-of-sentence allowed)."""
        return self._matcher.is_accepting()

    def _advance(self, token_ids: list[int]) -> None:
        if len(token_ids) < self._consumed:       # not expected, but cheap to honour
            self._matcher.rollback(self._consumed - len(token_ids))
            self._consumed = len(token_ids)
        new = token_ids[self._consumed:]
        self._consumed = len(token_ids)
        if new and not self._matcher.is_error():
            self._matcher.consume_tokens(list(new))

    def _bits(self, token_ids: list[int]) -> np.ndarray:
        """0/1 per token id (uint8 [n_vocab]): whether the grammar allows it after `token_ids`."""
        self._advance(token_ids)
        if self._matcher.is_error():
            # A token outside the grammar was forced on us (logit_bias, min_tokens...): the
            # output can no longer be valid, so end it.
            if not self._warned:
                log.warning("constrained generation left its grammar: %s",
                               self._matcher.get_error().splitlines()[0])
                self._warned = True
            bits = np.zeros(self.n_vocab, dtype=np.uint8)
            bits[self.eos_id] = 1
            return bits
        self._matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        return np.unpackbits(self._words.view(np.uint8), count=self.n_vocab, bitorder="little")

    def allowed(self, token_ids: list[int]) -> np.ndarray:
        """Boolean mask [n_vocab] of the tokens allowed after `token_ids` (the generated ids)."""
        return self._bits(token_ids).view(bool)

    def __call__(self, token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        blocked = self._bits(token_ids)[:logits.shape[-1]] == 0
        if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.is_contiguous():
            view = logits.numpy()
            np.copyto(view[:blocked.size], -np.inf, where=blocked)
            view[blocked.size:] = -np.inf
        else:
            full = torch.ones(logits.shape[-1], dtype=torch.bool)
            full[:blocked.size] = torch.from_numpy(blocked)
            logits.masked_fill_(full.to(logits.device), float("-inf"))
        return logits
