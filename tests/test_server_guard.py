"""A server you can put on a network: one key for every route, bounded requests, structured outputs, logprobs and
tools refused — against the real app (`python app.py --api-key ...`) on the tiny model, and every route of the
assembled app walked in-process.

The tiny model's words are gibberish: these check the protocol and the bounds. Structured outputs on the real
0.5B stand-in are in test_runtime_proxy.py.
"""
from __future__ import annotations

import json
import re
import time

import httpx
import openai
import pytest
from gradio_client import Client
from pydantic import BaseModel
from starlette.routing import Mount
from starlette.testclient import TestClient

import app
from allinone_gguf.faces import sessions
from allinone_gguf import Settings
from allinone_gguf.faces.http_guard import COOKIE, LOGIN, LOGOUT, session_value
from app_server import running_app

KEY = "sesame"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tiny_models):
    with running_app(tiny_models["Q4_K_M"], tiny_models["Q4_K_M"].parent, "--n-threads", "1", "--api-key", KEY,
                     "--max-body-bytes", str(1 << 20), "--max-classify-texts", "100") as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "v1", api_key=KEY, max_retries=0, timeout=120)


# ------------------------------------------------------------------------------------------- one key, every route

def all_routes(asgi) -> list[tuple[str, str]]:
    """(method, path) of every route the app serves, Gradio's mounted ones included, path parameters filled."""
    out = []

    def walk(routes, prefix):
        for r in routes:
            if isinstance(r, Mount):
                walk(r.routes, prefix + r.path)
                continue
            if hasattr(r, "original_router"):       # FastAPI's include_router (our router has no prefix)
                walk(r.original_router.routes, prefix)
                continue
            path = re.sub(r"\{[^}]+\}", "x", prefix + getattr(r, "path", ""))
            for method in sorted(getattr(r, "methods", None) or {"GET"}):
                if method != "HEAD":
                    out.append((method, path or "/"))
    walk(asgi.routes, "")
    return out


@pytest.fixture(scope="module")
def assembled(tiny_models):
    slot = sessions.ModelSlot(tiny_models["Q4_K_M"], tiny_models["Q4_K_M"].parent, Settings(n_threads=1))
    try:
        yield app.build_server(slot, KEY)
    finally:
        slot.bot.close()


def test_every_route_but_health_needs_the_key(assembled):
    routes = all_routes(assembled.app)
    paths = {p for _, p in routes}
    # the walk really reaches Gradio's API and the OpenAI routes
    assert {"/v1/chat/completions", "/v1/classify", "/v1/models", "/health"} <= paths
    assert any(p.startswith("/gradio_api/") for p in paths) and "/config" in paths and len(routes) > 30
    web = TestClient(assembled, raise_server_exceptions=False)
    for method, path in routes:
        r = web.request(method, path, follow_redirects=False)
        if path == "/health":
            assert r.status_code == 200, path
            continue
        if path in (LOGIN, LOGOUT):     # Gradio's own login routes: the Guard answers them with its form
            assert r.status_code in (200, 303, 401) and "text/html" in r.headers["content-type"] or path == LOGOUT
            continue
        assert r.status_code == 401, (method, path, r.status_code)
        assert r.json()["error"]["code"] == "invalid_api_key"
        wrong = web.request(method, path, headers={"Authorization": "Bearer nope"}, follow_redirects=False)
        assert wrong.status_code == 401, (method, path)
        web.cookies.set(COOKIE, session_value("nope"))
        forged = web.request(method, path, follow_redirects=False)
        web.cookies.clear()
        assert forged.status_code == 401, (method, path)
    # with the key the same routes answer whatever they answer, but not 401
    for method, path in [("GET", "/config"), ("GET", "/gradio_api/info"), ("GET", "/v1/models")]:
        assert web.request(method, path, headers=AUTH).status_code == 200, path


def test_websockets_need_the_key_too(assembled):
    from starlette.websockets import WebSocketDisconnect
    with pytest.raises(WebSocketDisconnect) as e:
        with TestClient(assembled).websocket_connect("/gradio_api/queue/join"):
            pass
    assert e.value.code == 1008


def test_a_browser_logs_in_once_and_keeps_a_cookie_not_the_key(server):
    with httpx.Client(base_url=server.url, follow_redirects=False, timeout=60) as web:
        page = web.get("/", headers={"Accept": "text/html"})
        assert page.status_code == 303 and page.headers["location"].startswith("/login")
        form = web.get(page.headers["location"])
        assert form.status_code == 200 and 'name="key"' in form.text
        wrong = web.post("/login", data={"key": "nope", "next": "/"})
        assert wrong.status_code == 401 and COOKIE not in web.cookies
        ok = web.post("/login", data={"key": KEY, "next": "https://elsewhere.example/"})
        assert ok.status_code == 303 and ok.headers["location"] == "/"       # never sent off-site
        assert web.cookies[COOKIE] == session_value(KEY) and KEY not in ok.headers["set-cookie"]
        assert "HttpOnly" in ok.headers["set-cookie"] and "SameSite=Strict" in ok.headers["set-cookie"]
        assert web.get("/").status_code == 200 and "gradio" in web.get("/").text.lower()
        assert web.get("/gradio_api/info").status_code == 200
        web.get("/logout")
        assert web.get("/gradio_api/info").status_code == 401


def test_gradio_api_and_health_with_and_without_the_key(server):
    assert httpx.get(server.url + "health").status_code == 200                       # open: load balancers
    call = httpx.post(server.url + "gradio_api/call/classify", json={"data": ["太好了", "zh"]})
    assert call.status_code == 401
    label, confidence = Client(server.url, verbose=False, headers=AUTH).predict("太好了", "zh", api_name="/classify")
    assert label in {"正面", "负面"} and confidence >= 0.5
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "v1", api_key="wrong", max_retries=0).models.list()


# ------------------------------------------------------------------------------------------------------- bounds

def test_a_body_over_the_bound_is_413_at_once_and_the_server_goes_on(server, client):
    big = json.dumps({"model": "x", "messages": [{"role": "user", "content": "长" * ((20 << 20) // 3)}]})
    start = time.monotonic()
    r = httpx.post(server.url + "v1/chat/completions", content=big.encode(), timeout=30,
                   headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert time.monotonic() - start < 5          # refused from its Content-Length, not after reading 20 MB

    def chunks():       # no Content-Length: counted as it arrives
        for _ in range(40):
            yield b"x" * 65536
    r = httpx.post(server.url + "v1/classify", content=chunks(), headers=AUTH, timeout=30)
    assert r.status_code == 413
    r = httpx.post(server.url + "gradio_api/call/classify", content=big.encode(), headers=AUTH, timeout=30)
    assert r.status_code == 413                  # Gradio's routes too
    assert client.chat.completions.create(model="x", messages=[{"role": "user", "content": "你好"}],
                                          max_tokens=2).choices[0].finish_reason in ("length", "stop")


def test_too_many_texts_to_classify_is_400_and_a_long_text_is_read_in_bounded_time(server):
    r = httpx.post(server.url + "v1/classify", json={"input": ["好"] * 101}, headers=AUTH, timeout=30)
    assert r.status_code == 400 and "101 texts" in r.json()["error"]["message"]
    assert r.json()["error"]["code"] == "too_many_inputs"
    r = httpx.post(server.url + "v1/classify", json={"input": ["好"] * 100}, headers=AUTH, timeout=120)
    assert r.status_code == 200 and len(r.json()["data"]) == 100
    long = "今天" * 200_000                                      # 400,000 characters, 1.2 MB: read head and tail
    r = httpx.post(server.url + "v1/classify", json={"input": long[:300_000]}, headers=AUTH, timeout=120)
    assert r.status_code == 200
    r = httpx.post(server.url + "v1/chat/completions", headers=AUTH, timeout=120,
                   json={"model": "x", "messages": [{"role": "user", "content": long[:300_000]}]})
    assert r.status_code == 400 and "max_text_chars" in r.json()["error"]["message"]


@pytest.mark.parametrize("body, fragment", [
    ({"max_tokens": -5}, "max_tokens must be >= 1, not -5"),
    ({"temperature": 3}, "temperature must be between 0 and 2"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools are not supported"),
    ({"functions": [{"name": "f", "parameters": {}}]}, "functions are not supported"),
    ({"top_logprobs": 3}, "top_logprobs needs logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs must be between 0 and 20"),
    ({"response_format": {"type": "yaml"}}, "response_format.type must be"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": "no"}}}, "json_schema must be"),
])
def test_what_the_server_cannot_do_is_a_clear_400(server, body, fragment):
    r = httpx.post(server.url + "v1/chat/completions", headers=AUTH, timeout=60,
                   json={"model": "x", "messages": [{"role": "user", "content": "你好"}], **body})
    assert r.status_code == 400, r.text
    assert fragment in r.json()["error"]["message"]


def test_tools_with_tool_choice_none_are_simply_not_called(client):
    r = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "你好"}], max_tokens=2,
                                       tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
                                       tool_choice="none")
    assert r.choices[0].message.tool_calls is None


# ------------------------------------------------------------------------------------ structured outputs, logprobs

class Mood(BaseModel):
    mood: str
    calm: bool


def test_json_schema_replies_parse_and_validate_even_from_random_weights(client):
    schema = {"type": "object", "properties": {"mood": {"enum": ["good", "bad"]}, "score": {"type": "integer"}},
              "required": ["mood", "score"], "additionalProperties": False}
    for seed in range(3):
        r = client.chat.completions.create(
            model="x", messages=[{"role": "user", "content": "今天怎么样？"}], max_tokens=64, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "m", "schema": schema, "strict": True}})
        choice = r.choices[0]
        if choice.finish_reason == "stop":          # a reply cut by max_tokens cannot be whole JSON
            value = json.loads(choice.message.content)
            assert set(value) == {"mood", "score"} and value["mood"] in ("good", "bad")
            assert isinstance(value["score"], int)
        else:
            assert re.fullmatch(r'\{ ?"mood" ?: ?"(good|bad)" ?, ?"score" ?: ?-?\d*', choice.message.content)


def test_the_official_clients_parse_helper_gets_a_pydantic_object(client):
    r = client.chat.completions.parse(model="x", messages=[{"role": "user", "content": "我好累"}],
                                      response_format=Mood, max_tokens=200, seed=3, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(choice.message.parsed, Mood)


def test_json_object_is_an_object(client):
    r = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "你好"}], max_tokens=3,
                                       response_format={"type": "json_object"})
    assert r.choices[0].message.content.startswith("{")


def test_logprobs_are_the_models_own_and_come_with_each_chunk(client):
    r = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "你好"}], max_tokens=6,
                                       temperature=0, logprobs=True, top_logprobs=3)
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens == 6
    for e in entries:
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and sum(2.718281828 ** t for t in tops) <= 1.0001
        assert e.logprob <= tops[0]
    # greedy: the first token is the likeliest (later ones pass the repetition penalty, which the model's own
    # probabilities do not include)
    assert entries[0].logprob == entries[0].top_logprobs[0].logprob
    assert entries[0].token == entries[0].top_logprobs[0].token
    whole = bytes(b for e in entries for b in e.bytes).decode("utf-8", "replace")
    content = r.choices[0].message.content
    assert whole.startswith(content) and len(whole) - len(content) <= 1      # a character cut by max_tokens
    chunks = list(client.chat.completions.create(model="x", messages=[{"role": "user", "content": "你好"}],
                                                 max_tokens=6, temperature=0, logprobs=True, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    # the same reply again (its prompt now comes from the KV cache, decoded in other batches: rounding differs)
    assert len(streamed) == 6
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in entries], abs=0.05)
    plain = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "你好"}], max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_the_api_alone_without_the_page_is_guarded_the_same(tiny_models):
    model = tiny_models["Q4_K_M"]
    with running_app(model, model.parent, "--n-threads", "1", "--api-key", KEY, "--no-page") as server:
        assert httpx.get(server.url + "health").status_code == 200
        assert httpx.get(server.url + "v1/models").status_code == 401
        assert httpx.get(server.url + "v1/models", headers=AUTH).json()["data"][0]["id"] == model.name
        assert httpx.get(server.url, headers=AUTH).status_code == 404            # no page
        assert httpx.post(server.url + "v1/classify", json={"input": "好"}, headers=AUTH).status_code == 200
