"""Offline batch API: `LLM(model=DIR).generate(prompts, SamplingParams(...))`."""
from __future__ import annotations

from dataclasses import replace

from tqdm.auto import tqdm

from .chat import ChatRequest, prepare_chat
from dsv32.model.bundled import default_model

from .config import EngineConfig
from .device import AUTO
from .engine import LLMEngine
from .sequence import RequestOutput, SamplingParams


class LLM:
    """Generate for a list of prompts (strings or {"prompt_token_ids": [...]}) with continuous batching."""

    def __init__(self, model: str | None = None, dtype: str = "float32", device: str = AUTO, **engine_kwargs):
        """`model`: a checkpoint directory (default: the bundled model); `device`: cpu, cuda[:N] or
        auto (cuda when present). `engine_kwargs` are EngineConfig's. With tensor_parallel_size > 1 the LLM owns worker
        processes: `shutdown()`, or leaving `with LLM(...) as llm:`, stops them (so does dropping
        the LLM, once it is garbage-collected)."""
        model = str(default_model()) if model is None else model
        self.engine = LLMEngine(EngineConfig(model=model, dtype=dtype, device=device,
                                             **engine_kwargs))
        self.tokenizer = self.engine.tokenizer

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """Stop the engine's tensor-parallel workers and end their group (nothing to do in one process)."""
        self.engine.shutdown()

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        params = params or SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        with tqdm(total=len(prompts), desc="generate", disable=not use_tqdm) as bar:
            return self.engine.generate([_prompt(p) for p in prompts], plist, lambda _: bar.update(1))

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


def _prompt(prompt: str | list[int] | dict) -> str | list[int]:
    """A prompt as the engine takes it: text or token ids ({"prompt"} or {"prompt_token_ids"})."""
    if not isinstance(prompt, dict):
        return prompt
    if "prompt_token_ids" in prompt:
        return prompt["prompt_token_ids"]
    if "prompt" in prompt:
        return prompt["prompt"]
    raise ValueError("prompt dict needs 'prompt' or 'prompt_token_ids'")
