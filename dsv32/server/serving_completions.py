"""`/v1/completions` and `/beta/completions`: raw text (or token ids) in, text out; with `suffix`
the prompt is the fill-in-the-middle one. Text prompts get the BOS token, token-id prompts are used
as given. With echo and logprobs, the engine computes the prompt's logprobs too (the first prompt
token has none; such requests skip the prefix cache)."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse

from dsv32.chat import ChatFormatError, fim_prompt
from dsv32.chat.messages import check_unicode
from dsv32.engine.sequence import RequestOutput

from .errors import APIError
from .generation import (
    KEEPALIVE, TIMEOUT, Generation, SSEResponse, request_key, sse, until_disconnect, with_keepalive,
)
from .protocol import Completion, CompletionChoice, CompletionRequest
from .sampling import TokenText, sampling_params, usage

_FINISH = {TIMEOUT: "insufficient_system_resource", "abort": "insufficient_system_resource"}
MAX_PROMPTS = 16


@dataclass
class Prompt:
    """One prompt of a request: what the engine gets, the echo text, and from which prompt token
    on the echo matches tokens (None: FIM, whose echo is the prefix only)."""

    engine: str | list[int]
    echo: str
    echo_from: int | None


def split_prompts(req: CompletionRequest, tokenizer) -> list[Prompt]:
    """The prompts of a request: one string or token-id list, or a batch of them."""
    p = req.prompt
    batch = p if isinstance(p, list) and p and isinstance(p[0], (str, list)) else [p]
    if not batch or any(isinstance(x, list) and not x for x in batch) or batch == [[]]:
        raise APIError(400, "prompt: must not be empty", param="prompt", code="invalid_format")
    if len(batch) > MAX_PROMPTS:
        raise APIError(422, f"prompt: at most {MAX_PROMPTS} prompts per request", param="prompt",
                       code="invalid_value")
    bos = tokenizer.decode([tokenizer.bos_id])
    prompts = []
    for name, text in (("prompt", batch), ("suffix", req.suffix)):
        try:
            check_unicode(text, name)
        except ChatFormatError as e:
            raise APIError(400, str(e), param=name, code="invalid_format") from None
    for x in batch:
        if isinstance(x, str) and req.suffix is not None:
            prompts.append(Prompt(fim_prompt(x, req.suffix), x, None))
        elif isinstance(x, str):
            prompts.append(Prompt(bos + x, x, 1))
        elif req.suffix is not None:
            raise APIError(400, "suffix: needs a text prompt", param="suffix", code="invalid_format")
        else:
            ids = [int(t) for t in x]
            prompts.append(Prompt(ids, tokenizer.decode([t for t in ids if 0 <= t < tokenizer.vocab_size]), 0))
    return prompts


class CompletionServing:
    """Handles one text completion request (possibly a batch of prompts)."""

    def __init__(self, state):
        self.state = state

    async def __call__(self, req: CompletionRequest, request: Request):
        model, _ = self.state.resolve_model(req.model)
        llm = self.state.ready()
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(422, "best_of: only best_of == n is supported", param="best_of", code="invalid_value")
        prompts = await asyncio.to_thread(split_prompts, req, llm.tokenizer)
        params = sampling_params(req, max_tokens=req.max_tokens, logprobs=req.logprobs, skip_special_tokens=True)
        if req.echo and req.logprobs is not None:
            params.prompt_logprobs = req.logprobs
        base = "cmpl-" + request.state.request_id
        gens: list[Generation] = []
        try:
            for i, prompt in enumerate(prompts):
                gens.append(await Generation.start(self.state, base if len(prompts) == 1 else f"{base}-{i}",
                                                   prompt.engine, params, request_key(request)))
        except BaseException:
            for g in gens:
                g.release()
            raise
        ctx = _Ctx(base, model, self.state.cfg.system_fingerprint, TokenText(llm.tokenizer), req,
                   prompts, max((len(s) for s in params.stop), default=1) - 1)

        def release() -> None:
            for g in gens:
                g.release()

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return SSEResponse(self._stream(gens, ctx, include_usage, request), request, on_close=release)
        try:
            outs = await until_disconnect(request, asyncio.gather(*(g.final() for g in gens)))
        finally:
            release()
        choices = [c for i, out in enumerate(outs) for c in ctx.final_choices(i, out)]
        total = _sum_usage([usage(o) for o in outs])
        return JSONResponse(Completion(id=base, created=ctx.created, model=model,
                                       system_fingerprint=ctx.fingerprint, choices=choices,
                                       usage=total).model_dump())

    async def _stream(self, gens: list[Generation], ctx: "_Ctx", include_usage: bool,
                      request: Request) -> AsyncIterator[str]:
        sent: dict[int, tuple[int, int]] = {}       # choice -> (chars sent, tokens sent)
        finals: dict[int, RequestOutput] = {}
        try:
            async for item in with_keepalive(_merge(gens), self.state.cfg.sse_keepalive):
                if item is None:
                    yield KEEPALIVE
                    continue
                i, out = item
                for o in out.outputs:
                    choice = ctx.stream_choice(i, out, o, sent)
                    if choice is not None:
                        yield sse(ctx.chunk([choice], include_usage))
                if out.finished:
                    finals[i] = out
        except APIError as e:
            yield sse(e.body())
        except Exception as e:
            yield sse(APIError(500, f"generation failed: {e}").body())
        else:
            if include_usage:
                total = _sum_usage([usage(finals[i]) for i in sorted(finals)])
                yield sse(ctx.chunk([], True, total))
        request.scope.setdefault("state", {})["stream_done"] = True
        yield sse("[DONE]")


async def _merge(gens: list[Generation]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave the outputs of several generations as they come: (prompt index, output)."""
    if len(gens) == 1:
        async for out in gens[0].outputs():
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, g: Generation) -> None:
        try:
            async for out in g.outputs():
                await queue.put((i, out))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            await queue.put((i, e))
            return
        await queue.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _sum_usage(parts):
    total = parts[0]
    for u in parts[1:]:
        total = usage_add(total, u)
    return total


def usage_add(a, b):
    """Field-wise sum of two Usage objects."""
    d = a.model_copy(deep=True)
    for f in ("prompt_tokens", "completion_tokens", "total_tokens", "prompt_cache_hit_tokens",
              "prompt_cache_miss_tokens"):
        setattr(d, f, getattr(a, f) + getattr(b, f))
    d.prompt_tokens_details.cached_tokens += b.prompt_tokens_details.cached_tokens
    return d


class _Ctx:
    """Per-answer constants and the text/logprobs of each choice."""

    def __init__(self, id: str, model: str, fingerprint: str, text: TokenText, req: CompletionRequest,
                 prompts: list[Prompt], holdback: int):
        self.id, self.model, self.fingerprint, self.text = id, model, fingerprint, text
        self.created = int(time.time())
        self.req, self.prompts, self.n, self.holdback = req, prompts, req.n, holdback

    def _echo(self, i: int, out: RequestOutput) -> tuple[str, list | None]:
        """Echo text and the (token id, logprob or None) of each prompt token it covers."""
        if not self.req.echo:
            return "", None
        p = self.prompts[i]
        if p.echo_from is None:
            return p.echo, None
        lps = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
        return p.echo, list(zip(out.prompt_token_ids, lps))[p.echo_from:]

    def _logprobs(self, o, start: int, offset: int, prompt=None):
        if self.req.logprobs is None or o.logprobs is None:
            return None
        return self.text.text_logprobs(o.logprobs[start:], self.req.logprobs, offset, prompt)

    def final_choices(self, i: int, out: RequestOutput) -> list[CompletionChoice]:
        echo, echo_ids = self._echo(i, out)
        offset = 0 if echo_ids is not None else len(echo)
        return [CompletionChoice(index=i * self.n + o.index, text=echo + o.text,
                                 logprobs=self._logprobs(o, 0, offset, echo_ids),
                                 finish_reason=_FINISH.get(o.finish_reason, o.finish_reason))
                for o in out.outputs]

    def stream_choice(self, i: int, out: RequestOutput, o, sent: dict) -> CompletionChoice | None:
        """The next chunk of one choice, or None when it has nothing new."""
        index = i * self.n + o.index
        first = index not in sent
        chars, toks = sent.get(index, (0, 0))
        finished = o.finish_reason is not None
        end = len(o.text) if finished else max(chars, len(o.text) - self.holdback)
        echo, echo_ids = self._echo(i, out)
        if first:
            lps = self._logprobs(o, toks, 0 if echo_ids is not None else len(echo), echo_ids)
        else:
            lps = self._logprobs(o, toks, len(echo) + chars)
            echo = ""
        if not first and end == chars and not (lps and lps.tokens) and not finished:
            return None
        sent[index] = (end, len(o.logprobs or []))
        return CompletionChoice(index=index, text=echo + o.text[chars:end], logprobs=lps,
                                finish_reason=_FINISH.get(o.finish_reason, o.finish_reason) if finished else None)

    def chunk(self, choices: list[CompletionChoice], include_usage: bool, usage=None) -> dict:
        fields = {"usage": usage} if include_usage else {}
        return Completion(id=self.id, object="text_completion", created=self.created, model=self.model,
                          system_fingerprint=self.fingerprint, choices=choices, **fields).model_dump(
                              exclude_unset=True)
