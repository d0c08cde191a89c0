"""The built-in chat page at `/`, driven in headless Chromium: it streams the answer, keeps the
thinking collapsed, and shows a tool call while it is being generated."""
import json
import shutil
import tempfile
import time

import pytest
import torch

from dsv32.chat import render_tool_calls
from dsv32.engine.engine import EngineConfig, LLMEngine
from dsv32.server import ServerConfig, create_app

from .conftest import ForceTokens, RunningServer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="chromium and chromedriver are not installed "
                                       "(apt-get install chromium chromium-driver)")

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]


class SlowForce(ForceTokens):
    """Forced tokens, a little slowly, so that the page is seen mid-stream."""

    def __call__(self, out, logits: torch.Tensor) -> torch.Tensor:
        time.sleep(0.03)
        return super().__call__(out, logits)


@pytest.fixture(scope="module")
def page_server(server_ckpt, server_model, tokenizer):
    """A server whose model always thinks, answers and calls get_weather(city="Paris")."""
    call = render_tool_calls([{"type": "function", "function": {"name": "get_weather",
                                                                "arguments": {"city": "Paris"}}}])
    text = "The user wants the weather. I should call the tool.</think>Checking the weather." + call
    ids = tokenizer.encode(text) + [tokenizer.eos_id]
    cfg = ServerConfig(engine=EngineConfig(model=str(server_ckpt), max_model_len=1024), served_model_name="tiny")
    app = create_app(cfg, engine_factory=lambda: LLMEngine(cfg.engine, model=server_model),
                     extra_processors=lambda req: [SlowForce(ids)])
    s = RunningServer(app).wait_ready()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 f"--user-data-dir={tempfile.mkdtemp(prefix='dsv32-chromium-')}", "--window-size=1100,800"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def wait_for(fn, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_chat_page_streams_thinking_and_tool_calls(page_server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(page_server.url + "/")
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#model option"), what="the model list")
    options = [o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#model option")]
    assert "deepseek-reasoner" in options
    browser.find_element(By.ID, "thinking").click()
    browser.find_element(By.CSS_SELECTOR, "#tools-box summary").click()
    browser.find_element(By.ID, "tools").send_keys(json.dumps(TOOLS))
    browser.find_element(By.ID, "input").send_keys("What is the weather in Paris?")
    browser.find_element(By.ID, "send").click()

    answer = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, ".msg.assistant"),
                      what="the answer bubble")[0]
    # mid-stream: reasoning arrives (collapsed) before the answer is done
    wait_for(lambda: browser.execute_script(
        "const r = document.querySelector('.reasoning'); return r && r.textContent.length > 0;"), what="reasoning")
    assert answer.get_attribute("data-done") == "false"
    # the tool call shows up while its arguments are still streaming
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, ".tool-call .name"), what="the tool call")
    assert answer.get_attribute("data-done") == "false"
    wait_for(lambda: answer.get_attribute("data-done") == "true", what="the end of the answer")

    details = answer.find_element(By.CSS_SELECTOR, "details.thinking")
    assert details.get_attribute("open") is None                      # thinking stays collapsed
    reasoning = browser.execute_script("return document.querySelector('.reasoning').textContent")
    assert reasoning == "The user wants the weather. I should call the tool."
    assert answer.find_element(By.CSS_SELECTOR, ".content").text == "Checking the weather."
    assert answer.find_element(By.CSS_SELECTOR, ".tool-call .name").text.endswith("get_weather")
    assert json.loads(answer.find_element(By.CSS_SELECTOR, ".tool-call .args").text) == {"city": "Paris"}
    assert answer.get_attribute("data-finish") == "tool_calls"
    assert "tokens" in answer.find_element(By.CSS_SELECTOR, ".stats").text
    browser.save_screenshot(str(tmp_path / "chat_page.png"))


# -- the demo tools, run in the page --------------------------------------------------------------

TOOL_CASES = [
    ("calculator", {"expression": "(2 + 3) * 4"}), ("calculator", {"expression": "7 / 2"}),
    ("calculator", {"expression": "2 ** 10 - -3"}), ("calculator", {"expression": "1 / 3"}),
    ("calculator", {"expression": "-2 ** 2"}), ("calculator", {"expression": "0.1 + 0.2"}),
    ("calculator", {"expression": "2 ** 0.5 * 1e3"}), ("calculator", {"expression": "10 ** 20"}),
    ("calculator", {"expression": "1 / 0"}), ("calculator", {"expression": "2 ^ 3"}),
    ("calculator", {"expression": "(1 + 2"}), ("calculator", {"expression": " "}),
    ("calculator", {"expression": 12.5}), ("calculator", {"expression": "10 ** 200"}),
    ("calculator", {"expression": "2 ** 3 ** 2 / -(4 - 8)"}), ("calculator", {"expression": "1e400"}),
    ("get_weather", {"city": "Paris", "date": "2024-01-17"}),
    ("get_weather", {"city": "  new   york ", "date": "2025-07-19"}),
    ("get_weather", {"city": "Reykjavik", "date": "2026-02-01"}),
    ("get_weather", {"city": "Oslo", "date": "tomorrow"}), ("get_weather", {"city": " ", "date": "2024-01-01"}),
    ("convert_units", {"value": 12, "from_unit": "km", "to_unit": "mi"}),
    ("convert_units", {"value": 100, "from_unit": "c", "to_unit": "f"}),
    ("convert_units", {"value": "5", "from_unit": "Pounds", "to_unit": "kg"}),
    ("convert_units", {"value": 1.5, "from_unit": "gal", "to_unit": "l"}),
    ("convert_units", {"value": -40, "from_unit": "degrees fahrenheit", "to_unit": "°C"}),
    ("convert_units", {"value": 3, "from_unit": "km", "to_unit": "kg"}),
    ("convert_units", {"value": 3, "from_unit": "parsec", "to_unit": "km"}),
    ("convert_units", {"value": 3, "from_unit": "constructor", "to_unit": "toString"}),
    ("convert_units", {"value": "lots", "from_unit": "km", "to_unit": "m"}),
    ("convert_units", {"value": True, "from_unit": "km", "to_unit": "m"}),
    ("convert_units", {"value": 1, "from_unit": "km"}), ("calculator", {"expression": "1", "x": 2}),
    ("search", {"q": "x"}),
]


def test_page_tools_match_the_training_environments(server, browser):
    from dsv32.train.envs.registry import execute_tool_call, tool_specs

    browser.get(server.url + "/")
    assert browser.execute_script("return DEMO_TOOLS") == tool_specs()
    run = ("const done = arguments[arguments.length - 1];"
           "Promise.all(arguments[0].map(([n, a]) => runTool(n, a))).then(done, (e) => done('threw ' + e));")
    got = browser.execute_async_script(run, [[name, json.dumps(args)] for name, args in TOOL_CASES])
    assert got == [execute_tool_call(name, json.dumps(args)) for name, args in TOOL_CASES]
    assert browser.execute_async_script(
        "runTool('calculator', '{oops').then(arguments[arguments.length - 1])") == "Error: arguments are not valid JSON"


FORCE_BY_LAST_ROLE = """
const [forced, sent] = [arguments[0], window.sentBodies = []];
const realFetch = window.fetch;
window.fetch = (url, opts) => {
  if (url !== "/v1/chat/completions") return realFetch(url, opts);
  const body = JSON.parse(opts.body);
  const last = body.messages[body.messages.length - 1];
  body.x_force = forced[last.role].replaceAll("{result}", last.content);
  sent.push(body);
  return realFetch(url, {...opts, body: JSON.stringify(body)});
};
"""


def test_demo_tools_loop_call_result_answer(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    from dsv32.train.envs.calculator import calculator
    from dsv32.train.envs.registry import tool_specs

    call = render_tool_calls([{"type": "function", "function": {"name": "calculator",
                                                                "arguments": {"expression": "17 * 23"}}}])
    forced = {"user": "A product: the calculator knows.</think>" + call,
              "tool": "The tool says {result}.</think>17 * 23 = {result}."}
    browser.get(server.url + "/")
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#model option"), what="the model list")
    browser.execute_script(FORCE_BY_LAST_ROLE, forced)
    for box in ("thinking", "demo-tools"):
        browser.find_element(By.ID, box).click()
    browser.find_element(By.ID, "max-tokens").clear()
    browser.find_element(By.ID, "max-tokens").send_keys("100")
    browser.find_element(By.ID, "input").send_keys("What is 17 times 23?")
    browser.find_element(By.ID, "send").click()

    wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done=true]")) == 2,
             what="the answer after the tool result")
    bubbles = browser.find_elements(By.CSS_SELECTOR, "#log .msg")
    assert [b.get_attribute("class") for b in bubbles] == ["msg user", "msg assistant", "msg tool", "msg assistant"]
    user, first, result, answer = bubbles
    assert user.find_element(By.CSS_SELECTOR, ".label").text.lower() == "user"
    assert first.find_element(By.CSS_SELECTOR, "details.thinking summary").text.lower() == "thinking"
    assert first.find_element(By.CSS_SELECTOR, ".tool-call .name").text == "tool call: calculator"
    assert json.loads(first.find_element(By.CSS_SELECTOR, ".tool-call .args").text) == {"expression": "17 * 23"}
    assert first.get_attribute("data-finish") == "tool_calls"
    expected = calculator("17 * 23")
    assert result.find_element(By.CSS_SELECTOR, ".label").text.lower() == "tool result: calculator"
    assert result.find_element(By.CSS_SELECTOR, ".result").text == expected
    assert answer.find_element(By.CSS_SELECTOR, ".answer-label").text.lower() == "answer"
    assert answer.find_element(By.CSS_SELECTOR, ".content").text == f"17 * 23 = {expected}."
    assert answer.get_attribute("data-finish") == "stop"

    sent = browser.execute_script("return window.sentBodies")
    assert len(sent) == 2 and all(body["tools"] == tool_specs() for body in sent)
    tool_message = sent[1]["messages"][-1]
    assert tool_message["role"] == "tool" and tool_message["content"] == expected
    assert tool_message["tool_call_id"] == sent[1]["messages"][-2]["tool_calls"][0]["id"]
    assert not browser.find_element(By.ID, "send").get_attribute("disabled")
    browser.save_screenshot(str(tmp_path / "demo_tools.png"))
