"""Offline batch API: `LLM(model=DIR).generate(prompts, SamplingParams(...))`."""
from __future__ import annotations

from dataclasses import replace
from itertools import count

from tqdm.auto import tqdm

from .chat import ChatRequest, prepare_chat
from .engine import EngineConfig, LLMEngine
from .sequence import RequestOutput, SamplingParams


class LLM:
    """Generate for a list of prompts (strings or {"prompt_token_ids": [...]}) with continuous batching."""

    def __init__(self, model: str, dtype: str = "float32", device: str = "cpu", **engine_kwargs):
        self.engine = LLMEngine(EngineConfig(model=model, dtype=dtype, device=device, **engine_kwargs))
        self.tokenizer = self.engine.tokenizer
        self._ids = count()

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        params = params or SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"params: {len(plist)} SamplingParams for {len(prompts)} prompts")
        order = []
        for prompt, p in zip(prompts, plist):
            rid = f"offline-{next(self._ids)}"
            if isinstance(prompt, dict):
                if "prompt_token_ids" in prompt:
                    prompt = prompt["prompt_token_ids"]
                elif "prompt" in prompt:
                    prompt = prompt["prompt"]
                else:
                    raise ValueError("prompt dict needs 'prompt' or 'prompt_token_ids'")
            self.engine.add_request(rid, prompt, p)
            order.append(rid)
        done: dict[str, RequestOutput] = {}
        with tqdm(total=len(order), desc="generate", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        return [done[r] for r in order]

    def chat(self, messages: list[dict] | list[list[dict]], params: SamplingParams | None = None, *,
             thinking: bool = False, tools: list[dict] | None = None, tool_choice=None,
             response_format: dict | None = None, parallel_tool_calls: bool = True,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Answer one conversation (a list of messages) or several, under the same grammar safety
        net as the server (JSON response_format, tool calls only to offered tools). Texts keep the
        special tokens: `dsv32.chat.parse_completion(text, "thinking" if thinking else "chat")`
        splits reasoning, content and tool calls."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        params = params or SamplingParams()
        prompts, plist = [], []
        for conversation in conversations:
            request = ChatRequest(conversation, thinking=thinking, tools=tools, tool_choice=tool_choice,
                                  response_format=response_format, parallel_tool_calls=parallel_tool_calls)
            prepared = prepare_chat(request, self.engine.grammars)
            prompts.append(prepared.text)
            plist.append(replace(params, skip_special_tokens=False,
                                 logits_processors=params.logits_processors + prepared.processors))
        return self.generate(prompts, plist, use_tqdm=use_tqdm)
