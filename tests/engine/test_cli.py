"""`dsv32 generate` and `dsv32 chat` driven in-process."""
import dataclasses
import io
import json
import signal
import subprocess
import sys

import pytest

from dsv32.chat import render_tool_calls
from dsv32.cli import main
from dsv32.model.init_tiny import init_tiny


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return init_tiny(tmp_path_factory.mktemp("cli_tiny"), seed=4, layers=1, hidden=64)


def test_generate_prompts_and_file(ckpt, tmp_path, capsys):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt_token_ids": [3, 4, 5]}) + "\n"
                 + json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n")
    assert main(["generate", "--model", str(ckpt), "--prompt", "Hello", "--file", str(f),
                 "--max-tokens", "5", "--json", "--max-model-len", "256"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 3
    assert all(len(r["token_ids"]) == 5 and r["finish_reason"] == "length" for r in rows)
    assert rows[0]["prompt"] == "Hello"


def test_generate_without_prompts_is_a_clear_error(ckpt):
    with pytest.raises(SystemExit, match="--prompt"):
        main(["generate", "--model", str(ckpt)])


def test_chat_keeps_history_and_clears(ckpt, monkeypatch, capsys):
    from dsv32.engine import engine as engine_mod
    prompts = []
    real_add = engine_mod.LLMEngine.add_request

    def spy(self, rid, prompt, params=None, **kw):
        prompts.append(prompt)
        return real_add(self, rid, prompt, params, **kw)

    monkeypatch.setattr(engine_mod.LLMEngine, "add_request", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\nAgain\n/clear\nFresh\n/exit\n"))
    assert main(["chat", "--model", str(ckpt), "--max-tokens", "4", "--max-model-len", "512"]) == 0
    assert len(prompts) == 3
    assert "Hello" in prompts[1] and "Again" in prompts[1]        # history kept
    assert "Hello" not in prompts[2] and "Fresh" in prompts[2]    # /clear dropped it
    assert prompts[0].endswith("<｜Assistant｜><think>")          # thinking mode by default


class Force:
    """Logits processor: generate exactly `ids`."""

    def __init__(self, ids):
        self.ids = ids

    def __call__(self, out, logits):
        if len(out) < len(self.ids):
            logits.fill_(float("-inf"))
            logits[self.ids[len(out)]] = 0.0
        return logits


@pytest.fixture
def engine_spy(monkeypatch):
    """Records the prompts, aborts and shutdowns of the engines the CLI builds."""
    from dsv32.engine import engine as engine_mod
    # force: the texts the next answers are made of
    seen = {"prompts": [], "aborted": [], "shutdowns": 0, "force": []}
    real_add, real_abort = engine_mod.LLMEngine.add_request, engine_mod.LLMEngine.abort_request

    def add(self, rid, prompt, params=None, **kw):
        seen["prompts"].append(prompt)
        if seen["force"]:
            ids = self.tokenizer.encode(seen["force"].pop(0)) + [self.tokenizer.eos_id]
            params = dataclasses.replace(params, logits_processors=[Force(ids)])
        return real_add(self, rid, prompt, params, **kw)

    def abort(self, rid):
        seen["aborted"].append(rid)
        return real_abort(self, rid)

    def shutdown(self):
        seen["shutdowns"] += 1

    monkeypatch.setattr(engine_mod.LLMEngine, "add_request", add)
    monkeypatch.setattr(engine_mod.LLMEngine, "abort_request", abort)
    monkeypatch.setattr(engine_mod.LLMEngine, "shutdown", shutdown)
    return seen


def test_generate_and_chat_default_to_the_bundled_model(ckpt, monkeypatch, capsys):
    from dsv32.cli import build_parser
    from dsv32.engine import cli as engine_cli
    from dsv32.model import bundled
    from dsv32.server import cli as server_cli

    assert server_cli.default_model is bundled.default_model
    assert build_parser().parse_args(["chat"]).model is None
    assert build_parser().parse_args(["generate", "--prompt", "x"]).model is None
    asked = []
    monkeypatch.setattr(engine_cli, "default_model", lambda: asked.append(1) or ckpt)
    assert main(["generate", "--prompt", "Hi", "--max-tokens", "2", "--max-model-len", "256"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("/exit\n"))
    assert main(["chat", "--max-model-len", "256"]) == 0
    assert asked == [1, 1]


def test_a_model_directory_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint at"):
        main(["generate", "--model", str(tmp_path), "--prompt", "x"])


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_settings_the_model_refuses_end_the_command_with_their_message(ckpt, command):
    """A cache layout the model's dimensions do not take, or a context past its positions: the
    engine's message, not a traceback."""
    prompt = ["--prompt", "Hi"] if command == "generate" else []
    for flags, message in ((["--kv-cache-dtype", "fp8"], "FP8 caches need kv_lora_rank"),
                           (["--max-model-len", "99999999"], "max_model_len 99999999 exceeds the model's")):
        with pytest.raises(SystemExit, match=f"^dsv32 {command}: {message}"):
            main([command, "--model", str(ckpt), *prompt, *flags])


def test_lower_layers_do_not_import_the_server():
    code = ("import sys, dsv32.engine.cli, dsv32.model.bundled; "
            "print(sorted(m for m in sys.modules if m.startswith('dsv32.server')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_ctrl_c_at_the_prompt_quits_quietly(ckpt, engine_spy, monkeypatch, capsys):
    def interrupted(prompt=""):
        raise KeyboardInterrupt

    monkeypatch.setattr("builtins.input", interrupted)
    assert main(["chat", "--model", str(ckpt), "--max-model-len", "256"]) == 130
    assert engine_spy["shutdowns"] == 1 and engine_spy["prompts"] == []
    assert "Traceback" not in capsys.readouterr().err


def test_ctrl_c_during_an_answer_stops_it_and_returns_to_the_prompt(ckpt, engine_spy, monkeypatch, capsys):
    from dsv32.engine import engine as engine_mod
    real_step, steps = engine_mod.LLMEngine.step, []

    def step(self):
        steps.append(1)
        if len(steps) == 2:     # Ctrl-C in the middle of the first answer
            assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler, "Ctrl-C not handled"
            signal.raise_signal(signal.SIGINT)
        return real_step(self)

    monkeypatch.setattr(engine_mod.LLMEngine, "step", step)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\nAgain\n/exit\n"))
    before = signal.getsignal(signal.SIGINT)
    assert main(["chat", "--model", str(ckpt), "--max-tokens", "8", "--max-model-len", "512"]) == 0
    assert signal.getsignal(signal.SIGINT) is before
    assert engine_spy["aborted"] == ["chat-0"] and engine_spy["shutdowns"] == 1
    assert len(engine_spy["prompts"]) == 2
    assert "Again" in engine_spy["prompts"][1] and "Hello" not in engine_spy["prompts"][1]
    assert "(stopped" in capsys.readouterr().err
    assert len(steps) > 2       # the second answer was generated after the stop


def test_chat_without_tools_keeps_a_tool_call_as_content(ckpt, engine_spy, monkeypatch, capsys):
    import dsv32.engine.chat
    block = render_tool_calls([{"type": "function", "function": {"name": "get_weather",
                                                                "arguments": {"city": "Paris"}}}])
    engine_spy["force"] = ["Let me check." + block, "You're welcome."]
    conversations = []
    real_encode = dsv32.engine.chat.encode_messages

    def encode(messages, **kw):
        conversations.append(messages)
        return real_encode(messages, **kw)

    monkeypatch.setattr(dsv32.engine.chat, "encode_messages", encode)
    monkeypatch.setattr("sys.stdin", io.StringIO("Weather in Paris?\nThanks\n/exit\n"))
    assert main(["chat", "--model", str(ckpt), "--no-thinking", "--max-tokens", "80",
                 "--max-model-len", "512"]) == 0
    out = capsys.readouterr().out
    assert "Let me check." + block in out and "[tool call]" not in out
    assistant = conversations[1][1]
    assert assistant["content"] == "Let me check." + block and "tool_calls" not in assistant
    assert all(m["role"] != "tool" and "tools" not in m for m in conversations[1])


def test_generate_json_answers(ckpt, tmp_path, capsys):
    """--response-format / --json-schema constrain chat prompts (the same grammar as the server)."""
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}},
                                  "required": ["ok"], "additionalProperties": False}))
    assert main(["generate", "--model", str(ckpt), "--prompt", "Hi", "--chat", "--json-schema", str(schema),
                 "--max-tokens", "20", "--json", "--max-model-len", "256", "--temperature", "1", "--seed", "0"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["finish_reason"] == "stop" and json.loads(row["text"]) in ({"ok": True}, {"ok": False})
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}], "response_format": {
        "type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}}))
    with pytest.raises(SystemExit, match="response_format"):
        main(["generate", "--model", str(ckpt), "--file", str(bad), "--max-model-len", "256"])
