"""The output processor: sampled tokens become text (incremental detokenisation), stop tokens,
stop strings and length limits decide when a sequence ends, and requests become RequestOutputs."""
from __future__ import annotations

import time

from dsv32.chat.tokenizer import Tokenizer

from .sequence import CompletionOutput, RequestOutput, Sequence, TokenLogprob

Finish = tuple[str, str | int | None]      # (finish reason, the stop string or token that ended it)


class RequestState:
    """A request's sequences (n of them), their texts and detokenisers, and its timing."""

    def __init__(self, request_id: str, prompt: str | None, prompt_ids: list[int], seqs: list[Sequence],
                 detoks: list):
        self.request_id, self.prompt, self.prompt_ids = request_id, prompt, prompt_ids
        self.params, self.arrival = seqs[0].params, seqs[0].arrival
        self.seqs = seqs
        self.texts: list[str] = [""] * len(seqs)
        self.detoks = detoks
        self.first_token_time: float | None = None
        self.num_cached_tokens = 0

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    def sampled(self) -> None:
        """A token of this request was sampled: the first one fixes the timing and cache hits."""
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
            self.num_cached_tokens = self.seqs[0].num_cached_tokens


class OutputProcessor:
    """Detokenises each sampled token, decides whether it ends its sequence, and reports requests."""

    def __init__(self, tokenizer: Tokenizer, eos_token_id, max_model_len: int):
        self.tokenizer, self.eos_token_id, self.max_model_len = tokenizer, eos_token_id, max_model_len

    def track(self, request_id: str, prompt: str | None, prompt_ids: list[int], seqs: list[Sequence]
              ) -> RequestState:
        """The state of a new request whose `seqs` share one prompt and its SamplingParams."""
        skip = seqs[0].params.skip_special_tokens
        return RequestState(request_id, prompt, prompt_ids, seqs,
                            [self.tokenizer.detokenizer(skip_special_tokens=skip) for _ in seqs])

    def append(self, state: RequestState, seq: Sequence, tok: int, lp: TokenLogprob | None) -> Finish | None:
        """Append a sampled token to `seq` and its text; the finish when it ends the sequence."""
        seq.token_ids.append(tok)
        if lp is not None:
            seq.logprobs.append(lp)
        i = seq.index
        prev = len(state.texts[i])
        state.texts[i] += state.detoks[i].add(tok)
        finish = self._stop(state, seq, tok, prev)
        p = seq.params
        if finish is None and p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens:
            finish = ("length", None)
        if finish is None and len(seq) >= self.max_model_len:
            finish = ("length", None)
        return finish

    def _stop(self, state: RequestState, seq: Sequence, tok: int, prev: int) -> Finish | None:
        """End of sentence, a stop token, or a stop string in the text since `prev` (the text is
        then cut at the stop string, or after it with include_stop_str_in_output)."""
        p = seq.params
        if tok == self.eos_token_id and not p.ignore_eos:
            return "stop", None
        if tok in p.stop_token_ids:
            return "stop", tok
        if not p.stop:
            return None
        i, text = seq.index, state.texts[seq.index]
        start = max(0, prev - max(len(s) for s in p.stop) + 1)
        hits = [(text.find(s, start), s) for s in p.stop if text.find(s, start) >= 0]
        if not hits:
            return None
        at, s = min(hits)
        state.texts[i] = text[: at + len(s)] if p.include_stop_str_in_output else text[:at]
        return "stop", s

    @staticmethod
    def output(state: RequestState) -> RequestOutput:
        """Everything the request has produced so far."""
        outs = [CompletionOutput(index=seq.index, token_ids=seq.output_token_ids, text=text,
                                 logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
                                 finish_reason=seq.finish_reason, stop_reason=seq.stop_reason, error=seq.error)
                for seq, text in zip(state.seqs, state.texts)]
        first = state.seqs[0]
        return RequestOutput(
            request_id=state.request_id, prompt_token_ids=state.prompt_ids, outputs=outs,
            finished=state.finished, num_cached_tokens=state.num_cached_tokens, prompt=state.prompt,
            prompt_logprobs=list(first.prompt_logprobs) if first.params.prompt_logprobs is not None else None,
            metrics={"arrival": state.arrival, "first_token": state.first_token_time})
