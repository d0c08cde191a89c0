"""Request fields -> SamplingParams, and engine logprobs / token counts -> OpenAI shapes.

Sampling is the same in both modes: temperature, top_p, penalties, seed, logit_bias and logprobs
are honoured in thinking mode too (DeepSeek's API ignores the first ones and rejects logprobs
there); they apply to every generated token, the reasoning included.
"""
from __future__ import annotations

from dsv32.chat.tokenizer import Tokenizer
from dsv32.engine.sequence import RequestOutput, SamplingParams, TokenLogprob

from .errors import APIError, bad_value
from .protocol import (
    CompletionTokensDetails, PromptTokensDetails, TextLogprobs, TokenLogprobEntry, TopLogprob, Usage,
)

MAX_STOP = 16


def sampling_params(req, *, max_tokens: int | None, logprobs: int | None, skip_special_tokens: bool,
                    processors: list | None = None) -> SamplingParams:
    """SamplingParams from the shared sampling fields of a chat or completion request (422 on bad values)."""
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP:
        raise APIError(422, f"stop: at most {MAX_STOP} stop strings", param="stop", code="invalid_value")
    bias = None
    if req.logit_bias:
        try:
            bias = {int(k): float(v) for k, v in req.logit_bias.items()}
        except ValueError:
            raise APIError(422, "logit_bias: keys must be token ids written as integers",
                           param="logit_bias", code="invalid_value") from None
    top_p = 1.0 if req.top_p is None else req.top_p
    try:
        return SamplingParams(
            n=req.n,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=top_p if top_p > 0 else 1e-9,   # top_p 0: only the most likely token
            top_k=req.top_k if req.top_k not in (None, 0) else -1,
            min_p=req.min_p or 0.0,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=req.repetition_penalty or 1.0,
            logit_bias=bias, seed=req.seed, stop=stop, stop_token_ids=req.stop_token_ids,
            ignore_eos=req.ignore_eos, max_tokens=max_tokens, min_tokens=req.min_tokens,
            logprobs=logprobs, skip_special_tokens=skip_special_tokens,
            logits_processors=list(processors or []),
        )
    except ValueError as e:
        raise bad_value(e, 422) from None


def usage(out: RequestOutput, reasoning_tokens: int = 0) -> Usage:
    """Usage of a (finished) request; every field set so that dumps never drop one."""
    prompt = len(out.prompt_token_ids)
    completion = sum(len(o.token_ids) for o in out.outputs)
    hit = min(out.num_cached_tokens, prompt)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_cache_hit_tokens=hit, prompt_cache_miss_tokens=prompt - hit,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=hit),
                 completion_tokens_details=CompletionTokensDetails(reasoning_tokens=reasoning_tokens))


class TokenText:
    """Token ids -> the token strings and bytes that logprobs report."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def bytes(self, token_id: int) -> bytes:
        return self.tokenizer.token_bytes(token_id)

    def text(self, token_id: int) -> str:
        return self.bytes(token_id).decode("utf-8", errors="replace")

    def chat_entries(self, lps: list[TokenLogprob], top: int) -> list[TokenLogprobEntry]:
        """OpenAI chat logprobs: token, logprob, bytes and the `top` most likely alternatives."""
        entries = []
        for lp in lps:
            alts = [TopLogprob(token=self.text(t), logprob=_finite(v), bytes=list(self.bytes(t)))
                    for t, v in lp.top[:top]]
            entries.append(TokenLogprobEntry(token=self.text(lp.token_id), logprob=_finite(lp.logprob),
                                             bytes=list(self.bytes(lp.token_id)), top_logprobs=alts))
        return entries

    def text_logprobs(self, lps: list[TokenLogprob], top: int, offset: int,
                      prompt: list[tuple[int, TokenLogprob | None]] | None = None) -> TextLogprobs:
        """Legacy completions logprobs from char `offset`, after the echoed `prompt` tokens (token
        id, logprob or None for the first token of a prompt)."""
        result = TextLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for t, lp in prompt or []:
            result.tokens.append(self.text(t))
            result.token_logprobs.append(None if lp is None else _finite(lp.logprob))
            result.top_logprobs.append(None if lp is None else {self.text(a): _finite(v) for a, v in lp.top[:top]})
            result.text_offset.append(offset)
            offset += len(result.tokens[-1])
        for lp in lps:
            tok = self.text(lp.token_id)
            result.tokens.append(tok)
            result.token_logprobs.append(_finite(lp.logprob))
            result.top_logprobs.append({self.text(t): _finite(v) for t, v in lp.top[:top]})
            result.text_offset.append(offset)
            offset += len(tok)
        return result


def _finite(x: float) -> float:
    """JSON has no -inf: a token the request masked out reports the lowest float instead."""
    return x if x > -1e38 else -9999.0
