"""HTTPS (issue 35): the official client over TLS with a throwaway CA, mutual TLS through
`dsv32 serve --ssl-*`, and TLS flags that cannot work refused at start-up."""
import ssl
import time

import httpx
import openai
import pytest

from dsv32.cli import main
from dsv32.engine.engine import EngineConfig, LLMEngine
from dsv32.server import ServerConfig, create_app

from .certs import available_tool, make_certs
from .conftest import RunningServer
from .test_shutdown import Serve, free_port

pytestmark = pytest.mark.skipif(available_tool() is None, reason="needs the cryptography package or openssl")
USER = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


def trusting(certs, client_cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    if client_cert:
        ctx.load_cert_chain(certs.client_cert, certs.client_key)
    return ctx


def test_https_round_trip_with_the_official_client(certs, server_ckpt, server_model):
    engine_cfg = EngineConfig(model=str(server_ckpt), max_model_len=256, max_num_seqs=2)
    app = create_app(ServerConfig(engine=engine_cfg, served_model_name="tiny", api_keys=["sk-tls"]),
                     engine_factory=lambda: LLMEngine(engine_cfg, model=server_model))
    s = RunningServer(app, api_key="sk-tls", verify=trusting(certs),
                      ssl={"ssl_certfile": str(certs.server_cert), "ssl_keyfile": str(certs.server_key)})
    try:
        s.wait_ready()
        assert s.url.startswith("https://127.0.0.1:")
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="sk-tls", max_retries=0, timeout=30,
                               http_client=httpx.Client(verify=trusting(certs)))
        r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=3)
        assert r.usage.completion_tokens == 3
        chunks = list(client.chat.completions.create(model="tiny", messages=USER, max_tokens=3, stream=True))
        assert chunks[-1].choices[0].finish_reason in ("length", "stop")
        with pytest.raises(openai.APIConnectionError):      # the certificate is not in the default trust store
            openai.OpenAI(base_url=s.url + "/v1", api_key="sk-tls", max_retries=0, timeout=10).models.list()
        with pytest.raises(httpx.TransportError):            # plain HTTP to the TLS port
            httpx.get(s.url.replace("https", "http") + "/health", timeout=5)
    finally:
        s.stop()


def wait_ready(s: Serve, http: httpx.Client) -> None:
    deadline = time.monotonic() + 90
    while True:
        assert s.proc.poll() is None, s.proc.stdout.read()
        try:
            if http.get(s.url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_mutual_tls_through_dsv32_serve(certs, server_ckpt):
    s = Serve(server_ckpt, "--ssl-certfile", str(certs.server_cert), "--ssl-keyfile", str(certs.server_key),
              "--ssl-ca-certs", str(certs.ca), "--max-model-len", "256")
    s.url = s.url.replace("http://", "https://")
    try:
        with httpx.Client(verify=trusting(certs, client_cert=True)) as http:
            client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=30,
                                   http_client=http)
            wait_ready(s, http)
            assert client.chat.completions.create(model="m", messages=USER, max_tokens=2).usage.completion_tokens == 2
        with pytest.raises(openai.APIConnectionError):       # no client certificate: no connection
            openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=10,
                          http_client=httpx.Client(verify=trusting(certs))).models.list()
        code, out = s.terminate()
    finally:
        s.close()
    assert code == 0
    assert f"on https://127.0.0.1:{s.port}" in out and f"client certificates required (CA {certs.ca})" in out


def test_tls_flags_that_cannot_work(certs, server_ckpt, capsys, tmp_path):
    base = ["serve", "--model", str(server_ckpt), "--port", str(free_port())]
    assert main([*base, "--ssl-keyfile", str(certs.server_key)]) == 2
    assert "--ssl-keyfile need(s) --ssl-certfile" in capsys.readouterr().err
    assert main([*base, "--ssl-certfile", str(tmp_path / "missing.pem")]) == 2
    assert "TLS: No such file or directory" in capsys.readouterr().err
    assert main([*base, "--ssl-certfile", str(certs.server_cert), "--ssl-keyfile", str(certs.client_key)]) == 2
    assert "TLS:" in capsys.readouterr().err                    # a key that is not the certificate's
    assert main([*base, "--ssl-certfile", str(certs.server_cert), "--ssl-keyfile", str(certs.server_key),
                 "--ssl-cert-reqs", "required"]) == 2
    assert "needs --ssl-ca-certs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--ssl-certfile", str(certs.server_cert), "--ssl-cert-reqs", "always"])
