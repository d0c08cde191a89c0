"""API keys with names (issue 35): the key-file format and its errors, keys from a file beside
`--api-key` keys through the real server, the key's name (never the key) in the access log, and
/metrics behind the key unless --metrics-public."""
import logging

import httpx
import openai
import pytest

from dsv32.cli import main
from dsv32.server.keys import KeyFileError, KeyRing, Limits, fixed_keys, parse_key_file

from .conftest import key_client, keyed_server, start_server
from .test_shutdown import free_port

USER = [{"role": "user", "content": "Hi"}]
SECRETS = {"alice": "sk-alice-Zq81", "bob": "sk-bob-7Yt2", "flag": "sk-flag-0Wd3"}
KEY_FILE = f"""# team keys
alice: {SECRETS['alice']}

   # an indented comment
bob:{SECRETS['bob']}   max_concurrent=3 tpm=9000
"""


def test_key_file_format():
    keys = parse_key_file(KEY_FILE, Limits(max_concurrent=5))
    assert [(k.name, k.secret.decode()) for k in keys] == [("alice", SECRETS["alice"]), ("bob", SECRETS["bob"])]
    assert keys[0].limits == Limits(max_concurrent=5)                    # the defaults
    assert keys[1].limits == Limits(max_concurrent=3, tokens_per_minute=9000)
    assert SECRETS["alice"] not in repr(keys)


@pytest.mark.parametrize("text,why", [
    ("alice sk-1", "line 1: expected `NAME: KEY"),
    ("\n# c\nal ice: sk-1", "line 3: a name is"),
    ("alice:", "line 1: no key after 'alice'"),
    ("a: sk-1\nb: sk-2\na: sk-3", "line 3: the name 'a' is already used on line 1"),
    ("a: sk-SAME\nb: sk-SAME", "line 2: the same key as line 1"),
    ("a: sk-1 rpm=3", "line 1: unknown option 'rpm'"),
    ("a: sk-1 tpm=0", "line 1: tpm must be a positive integer"),
    ("a: sk-1 max_concurrent=two", "line 1: max_concurrent must be a positive integer"),
    ("# only comments\n\n", "no keys"),
])
def test_malformed_key_files(text, why):
    with pytest.raises(KeyFileError) as e:
        parse_key_file(text, Limits(), "keys.txt")
    assert why in str(e.value) and str(e.value).startswith("keys.txt")
    assert "sk-" not in str(e.value)                  # an error never quotes a key


def test_key_ring_reload(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_text("alice: sk-a\n")
    ring = KeyRing(fixed_keys(["sk-flag"], Limits()), path, Limits())
    assert ring.names() == ["api-key-1", "alice"] and ring.find(b"sk-a").name == "alice"
    assert ring.find(b"sk-flag").name == "api-key-1" and ring.find(b"sk-") is None and ring.find(b"") is None
    path.write_text("bob: sk-b\n")
    ring.reload()
    assert ring.find(b"sk-a") is None and ring.find(b"sk-b").name == "bob"
    for bad in ("api-key-1: sk-c\n", "bob sk-b\n"):     # a name the flags hold; malformed
        path.write_text(bad)
        with pytest.raises(KeyFileError):
            ring.reload()
        assert ring.names() == ["api-key-1", "bob"]     # the keys in use stay


def test_malformed_key_file_is_a_startup_error(server_ckpt, tmp_path, capsys):
    path = tmp_path / "keys.txt"
    path.write_text("alice: sk-secret-1\nbob sk-secret-2\n")
    assert main(["serve", "--model", str(server_ckpt), "--api-key-file", str(path), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert f"{path}, line 2: expected `NAME: KEY" in err and "sk-secret" not in err
    assert main(["serve", "--model", str(server_ckpt), "--api-key-file", str(tmp_path / "nope"),
                 "--port", str(free_port())]) == 2
    assert "cannot read the key file" in capsys.readouterr().err
    assert main(["serve", "--model", str(server_ckpt), "--max-concurrent-per-key", "2",
                 "--port", str(free_port())]) == 2
    assert "per-key limits need API keys" in capsys.readouterr().err


@pytest.fixture(scope="module")
def keyed(server_ckpt, server_model, tmp_path_factory):
    s = keyed_server(tmp_path_factory.mktemp("keys"), server_ckpt, server_model, KEY_FILE, SECRETS["alice"],
                     dict(max_model_len=512, max_num_seqs=4), api_keys=[SECRETS["flag"]])
    yield s
    s.stop()


def test_keys_from_file_and_flag_named_in_the_log(keyed, caplog):
    caplog.set_level(logging.DEBUG)
    for who in ("alice", "bob", "flag"):
        r = key_client(keyed, SECRETS[who]).chat.completions.create(model="tiny", messages=USER, max_tokens=2)
        assert r.usage.completion_tokens == 2
    with pytest.raises(openai.AuthenticationError):
        key_client(keyed, "sk-alice").models.list()
    assert httpx.get(keyed.url + "/v1/models", headers={"x-api-key": SECRETS["bob"].encode()}).status_code == 200
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "dsv32.server.access"]
    assert any(' alice "POST /v1/chat/completions" 200 ' in line for line in lines), lines
    assert any(' bob "POST /v1/chat/completions" 200 ' in line for line in lines), lines
    assert any(' api-key-1 "POST /v1/chat/completions" 200 ' in line for line in lines), lines
    assert any(' - "GET /v1/models" 401 ' in line for line in lines), lines
    server_log = "\n".join(rec.getMessage() for rec in caplog.records if rec.name.startswith(("dsv32", "uvicorn")))
    assert "dsv32.server.access" in {rec.name for rec in caplog.records}
    assert not [s for s in SECRETS.values() if s in server_log]


def test_metrics_behind_the_key(keyed, server_ckpt, server_model):
    assert httpx.get(keyed.url + "/health").status_code == 200
    page = httpx.get(keyed.url + "/")                    # the chat page and its script need no key
    tools = httpx.get(keyed.url + "/static/tools.js")
    assert page.status_code == tools.status_code == 200 and '<script src="/static/tools.js">' in page.text
    assert tools.headers["content-type"].startswith("text/javascript") and "function" in tools.text
    r = httpx.get(keyed.url + "/metrics")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    ok = httpx.get(keyed.url + "/metrics", headers={"Authorization": f"Bearer {SECRETS['bob']}".encode()})
    assert ok.status_code == 200 and "dsv32:http_requests_total" in ok.text
    public = start_server(server_ckpt, server_model, engine_kw=dict(max_model_len=256, max_num_seqs=2),
                          api_keys=["sk-x"], metrics_public=True).wait_ready()
    try:
        assert httpx.get(public.url + "/metrics").status_code == 200
        assert httpx.get(public.url + "/v1/models").status_code == 401
    finally:
        public.stop()

