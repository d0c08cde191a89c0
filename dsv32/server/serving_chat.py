"""`/v1/chat/completions`: messages -> V3.2 prompt -> engine -> parser events -> OpenAI answers.

Thinking is on for `deepseek-reasoner`, off for `deepseek-chat` and the served name, unless the
request says otherwise with `thinking: {"type": ...}` or `chat_template_kwargs: {"thinking": ...}`
(`--reasoning-only` forces it on). The completion is decoded with special tokens kept, so that the
parser sees `</think>` and the end-of-sentence marker; it splits reasoning, content and tool calls.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import JSONResponse

from dsv32.chat import (
    ContentDelta, Done, MessageBuilder, ReasoningDelta, StreamParser, ToolCallArguments, ToolCallStart,
)
from dsv32.engine.chat import ChatPrompt, ChatRequest, InvalidRequest, prepare_chat
from dsv32.engine.sequence import CompletionOutput, RequestOutput

from .errors import APIError
from .generation import (
    KEEPALIVE, TIMEOUT, Generation, SSEResponse, request_key, sse, until_disconnect, with_keepalive,
)
from .protocol import (
    ChatChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChatMessage, ChoiceLogprobs,
    ChunkChoice, Delta, DeltaFunctionCall, DeltaToolCall, FunctionCall, NamedToolChoice, ToolCall,
)
from .sampling import TokenText, sampling_params, usage
from .state import ServerState

log = logging.getLogger("dsv32.server")
# finish reasons of the engine that the parser does not decide
_FINISH = {"length": "length", TIMEOUT: "insufficient_system_resource", "abort": "insufficient_system_resource"}

# A test hook: extra logits processors for a request (the app factory's `extra_processors`).
ProcessorHook = Callable[[ChatCompletionRequest], list]


def request_thinking(req: ChatCompletionRequest, default: bool) -> bool:
    """The thinking switch in its three spellings: `thinking`, `chat_template_kwargs`, model id."""
    if req.thinking is not None:
        return req.thinking.type == "enabled"
    kwargs = req.chat_template_kwargs or {}
    for key in ("thinking", "enable_thinking"):
        if key in kwargs:
            value = kwargs[key]
            if not isinstance(value, bool):
                raise APIError(400, f"chat_template_kwargs.{key} must be true or false",
                               param="chat_template_kwargs", code="invalid_format")
            return value
    return default


def events_to_deltas(events: list) -> list[tuple[Delta, str | None]]:
    """Parser events -> (delta, finish_reason from Done) pairs; adjacent text of one kind merges."""
    result: list[tuple[Delta, str | None]] = []
    for ev in events:
        prev = result[-1][0] if result else None
        if isinstance(ev, ReasoningDelta):
            if prev is not None and prev.model_fields_set == {"reasoning_content"}:
                prev.reasoning_content += ev.text
            else:
                result.append((Delta(reasoning_content=ev.text), None))
        elif isinstance(ev, ContentDelta):
            if prev is not None and prev.model_fields_set == {"content"}:
                prev.content += ev.text
            else:
                result.append((Delta(content=ev.text), None))
        elif isinstance(ev, ToolCallStart):
            call = DeltaToolCall(index=ev.index, id=ev.id, type="function",
                                 function=DeltaFunctionCall(name=ev.name, arguments=""))
            result.append((Delta(tool_calls=[call]), None))
        elif isinstance(ev, ToolCallArguments):
            call = DeltaToolCall(index=ev.index, function=DeltaFunctionCall(arguments=ev.text))
            result.append((Delta(tool_calls=[call]), None))
        elif isinstance(ev, Done):
            result.append((Delta(), ev.finish_reason))
    return result


def reasoning_tokens(token_ids: list[int], think_end_id: int, thinking: bool) -> int:
    """Tokens generated before `</think>` (all of them if it never came); 0 outside thinking."""
    if not thinking:
        return 0
    return token_ids.index(think_end_id) if think_end_id in token_ids else len(token_ids)


class ChatServing:
    """Handles one chat completion request: prompt, sampling, then a JSON or SSE answer."""

    def __init__(self, state: ServerState, extra_processors: ProcessorHook | None = None):
        self.state = state
        self.extra_processors = extra_processors

    async def __call__(self, req: ChatCompletionRequest, request: Request):
        model, default_thinking = self.state.resolve_model(req.model)
        llm = self.state.ready()
        tok = llm.tokenizer
        thinking = True if self.state.cfg.reasoning_only else request_thinking(req, default_thinking)
        prepared = await self._prepare(req, thinking, llm)
        prompt, mode = prepared.text, prepared.mode
        top = req.top_logprobs or 0
        if req.top_logprobs and not req.logprobs:
            raise APIError(422, "top_logprobs: requires logprobs to be true", param="top_logprobs",
                           code="invalid_value")
        params = sampling_params(
            req, max_tokens=req.max_completion_tokens or req.max_tokens,
            logprobs=top if req.logprobs else None, skip_special_tokens=False,
            processors=prepared.processors)
        request_id = "chatcmpl-" + request.state.request_id
        gen = await Generation.start(self.state, request_id, prompt, params, request_key(request))
        ctx = _Context(request_id, model, int(time.time()), self.state.cfg.system_fingerprint, mode,
                       tok.think_end_id, TokenText(tok), top if req.logprobs else None)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            holdback = max((len(s) for s in params.stop), default=1) - 1
            return SSEResponse(self._stream(gen, ctx, include_usage, holdback, request), request,
                               on_close=gen.release)
        try:
            out = await until_disconnect(request, gen.final())
        finally:
            gen.release()
        return JSONResponse(self._answer(out, ctx).model_dump())

    # ---- request -> prompt and processors ------------------------------------------------------
    async def _prepare(self, req: ChatCompletionRequest, thinking: bool, llm) -> ChatPrompt:
        """Prompt, parse mode and grammar processors, built off the event loop (rendering a long
        conversation or compiling a grammar takes time; the first grammar builds the tokenizer's
        llguidance view, about a second)."""
        if req.tools and self.state.cfg.reasoning_only:
            raise APIError(400, "this server runs a reasoning-only model (DeepSeek-V3.2-Speciale), "
                                "which does not support tool calling: send the request without tools",
                           param="tools", code="tools_not_supported")
        rf = req.response_format
        chat = ChatRequest(
            messages=req.messages, thinking=thinking,
            tools=[t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None,
            tool_choice=req.tool_choice.model_dump() if isinstance(req.tool_choice, NamedToolChoice)
            else req.tool_choice,
            response_format=rf.model_dump(exclude_none=True) if rf is not None else None,
            parallel_tool_calls=req.parallel_tool_calls is not False)
        try:
            prepared = await asyncio.to_thread(prepare_chat, chat, llm.engine.grammars,
                                               self.state.cfg.safety_net)
        except InvalidRequest as e:
            code = "invalid_format" if e.param in ("messages", "tool_choice") else "invalid_schema"
            raise APIError(400, str(e), param=e.param, code=code) from None
        if self.extra_processors is not None:     # before the grammar, which has the last word
            prepared.processors[:0] = self.extra_processors(req)
        return prepared

    # ---- answers ---------------------------------------------------------------------------------
    def _answer(self, out: RequestOutput, ctx: "_Context") -> ChatCompletion:
        choices, reasoning = [], 0
        for o in out.outputs:
            parser = StreamParser(ctx.mode)
            builder = MessageBuilder(ctx.mode)
            events = parser.feed(o.text) + parser.finish()
            for ev in events:
                builder.apply(ev)
            msg = builder.message()
            calls = [ToolCall(id=c["id"], function=FunctionCall(**c["function"])) for c in msg["tool_calls"]]
            finish = _FINISH.get(o.finish_reason) or events[-1].finish_reason
            choices.append(ChatChoice(
                index=o.index,
                message=ChatMessage(content=msg["content"] if msg["content"] or not calls else None,
                                    reasoning_content=msg["reasoning_content"], tool_calls=calls or None),
                logprobs=ctx.logprobs(o, 0), finish_reason=finish))
            reasoning += reasoning_tokens(o.token_ids, ctx.think_end_id, ctx.mode == "thinking")
        return ChatCompletion(id=ctx.id, created=ctx.created, model=ctx.model,
                              system_fingerprint=ctx.fingerprint, choices=choices,
                              usage=usage(out, reasoning))

    async def _stream(self, gen: Generation, ctx: "_Context", include_usage: bool, holdback: int,
                      request: Request) -> AsyncIterator[str]:
        streams = [_ChoiceStream(i, ctx.mode, holdback) for i in range(gen.params.n)]
        first = {"reasoning_content": ""} if ctx.mode == "thinking" else {"content": ""}
        for s in streams:
            yield sse(ctx.chunk([ChunkChoice(index=s.index, delta=Delta(role="assistant", **first),
                                             logprobs=None, finish_reason=None)], include_usage))
        last = None
        try:
            async for out in with_keepalive(gen.outputs(), self.state.cfg.sse_keepalive):
                if out is None:
                    yield KEEPALIVE
                    continue
                last = out
                for o in out.outputs:
                    for choice in streams[o.index].step(o, ctx):
                        yield sse(ctx.chunk([choice], include_usage))
        except APIError as e:
            yield sse(e.body())
        except Exception as e:  # the engine failed mid-stream: report it in-band
            yield sse(APIError(500, f"generation failed: {e}").body())
        else:
            if include_usage and last is not None:
                reasoning = sum(reasoning_tokens(o.token_ids, ctx.think_end_id, ctx.mode == "thinking")
                                for o in last.outputs)
                yield sse(ctx.chunk([], True, usage(last, reasoning)))
        request.scope.setdefault("state", {})["stream_done"] = True
        yield sse("[DONE]")


class _Context:
    """What every chunk of one answer repeats, and the logprobs formatter."""

    def __init__(self, id: str, model: str, created: int, fingerprint: str, mode: str, think_end_id: int,
                 text: TokenText, top: int | None):
        self.id, self.model, self.created, self.fingerprint = id, model, created, fingerprint
        self.mode, self.think_end_id, self.text, self.top = mode, think_end_id, text, top

    def logprobs(self, o: CompletionOutput, start: int) -> ChoiceLogprobs | None:
        if self.top is None or o.logprobs is None:
            return None
        return ChoiceLogprobs(content=self.text.chat_entries(o.logprobs[start:], self.top))

    def chunk(self, choices: list[ChunkChoice], include_usage: bool, usage=None) -> dict[str, Any]:
        fields = {"usage": usage} if include_usage else {}
        return ChatCompletionChunk(id=self.id, object="chat.completion.chunk", created=self.created,
                                   model=self.model, system_fingerprint=self.fingerprint, choices=choices,
                                   **fields).model_dump(exclude_unset=True)


class _ChoiceStream:
    """One choice of a streamed answer: feeds new text to its parser, emits chunk choices."""

    def __init__(self, index: int, mode: str, holdback: int):
        self.index, self.holdback = index, holdback
        self.parser = StreamParser(mode)
        self.fed = 0          # characters of the completion given to the parser
        self.tokens = 0       # tokens whose logprobs were sent
        self.done = False

    def step(self, o: CompletionOutput, ctx: _Context) -> list[ChunkChoice]:
        if self.done:
            return []
        finished = o.finish_reason is not None
        # while running, hold back what a stop string may still cut off
        end = len(o.text) if finished else max(self.fed, len(o.text) - self.holdback)
        events = self.parser.feed(o.text[self.fed:end]) if end > self.fed else []
        self.fed = end
        if finished:
            events += self.parser.finish()
            self.done = True
        logprobs = ctx.logprobs(o, self.tokens)
        self.tokens = len(o.token_ids)
        choices = []
        for delta, finish in events_to_deltas(events):
            if finish is not None:
                finish = _FINISH.get(o.finish_reason) or finish
            choices.append(ChunkChoice(index=self.index, delta=delta, logprobs=logprobs, finish_reason=finish))
            logprobs = None
        if logprobs is not None and logprobs.content:
            choices.append(ChunkChoice(index=self.index, delta=Delta(), logprobs=logprobs, finish_reason=None))
        return choices
