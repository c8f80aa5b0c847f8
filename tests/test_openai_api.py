"""The OpenAI-compatible API (/v1) as real clients use it: the official `openai` package and plain HTTP, against
the real server (`python app.py`) on the tiny model; error mapping against a fake runtime.

The tiny model's words are gibberish, so these check the protocol, the bookkeeping and that concurrent answers
are complete and each its own — not what the replies say.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from conftest import FakeRuntime
from fastapi import FastAPI
from fastapi.testclient import TestClient

from allinone_gguf.faces.openai_api import build_router
from allinone_gguf.runtime import ContextOverflow, QueueFull
from app_server import running_app

LABELS = {"正面", "负面"}


@pytest.fixture(scope="module")
def server(tiny_models):
    with running_app(tiny_models["Q4_K_M"], tiny_models["Q4_K_M"].parent, "--n-threads", "1",
                     "--parallel", "4", "--api-key", "sesame") as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "v1", api_key="sesame", max_retries=0, timeout=120)


def ask(client, text: str, **kw):
    return client.chat.completions.create(model="any", messages=[{"role": "user", "content": text}], **kw)


def test_models_lists_the_loaded_file(client, tiny_models):
    assert [m.id for m in client.models.list()] == [tiny_models["Q4_K_M"].name]


def test_chat_completion_with_sentiment_usage_and_length(client):
    r = ask(client, "今天的实验终于成功了，太棒了！", max_tokens=6, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str) and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens > 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6
    s = r.model_extra["sentiment"]
    assert s["label"] in LABELS and s["confidence"] == max(s["probs"].values())


def test_streaming_sends_sentiment_first_then_pieces_then_usage(client):
    chunks = list(ask(client, "我好累", max_tokens=5, stream=True, stream_options={"include_usage": True}))
    first = chunks[0]
    assert first.choices[0].delta.role == "assistant" and first.model_extra["sentiment"]["label"] in LABELS
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"] and chunks[-1].usage.completion_tokens == 5
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    again = ask(client, "我好累", max_tokens=5, temperature=0)
    assert isinstance(text, str) and again.usage.prompt_tokens == chunks[-1].usage.prompt_tokens


def test_seed_reproduces_and_history_is_used(client):
    messages = [{"role": "system", "content": "ignored"}, {"role": "user", "content": "我叫小明"},
                {"role": "assistant", "content": "你好小明"}, {"role": "user", "content": "我叫什么？"}]
    a = client.chat.completions.create(model="m", messages=messages, max_tokens=8, seed=11, temperature=0.9)
    b = client.chat.completions.create(model="m", messages=messages, max_tokens=8, seed=11, temperature=0.9)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert b.usage.prompt_tokens_details.cached_tokens > 0          # the same history: its KV slot was reused
    alone = ask(client, "我叫什么？", max_tokens=1)
    assert a.usage.prompt_tokens > alone.usage.prompt_tokens


def test_stop_string_ends_the_reply(client):
    r = ask(client, "随便说点什么", max_tokens=12, temperature=0)
    text = r.choices[0].message.content
    if len(text) >= 3:
        cut = ask(client, "随便说点什么", max_tokens=12, temperature=0, stop=[text[1:3]])
        assert cut.choices[0].message.content == text[:1] and cut.choices[0].finish_reason == "stop"


def test_the_wellbeing_trend_rides_on_the_reply_and_a_client_can_turn_it_off(client):
    messages = [{"role": "system", "content": "ignored"}, {"role": "user", "content": "我好难过"},
                {"role": "assistant", "content": "怎么了？"}, {"role": "user", "content": "考试又没过"}]
    r = client.chat.completions.create(model="any", messages=messages, max_tokens=4)
    trend = r.model_extra["wellbeing"]
    # whatever the tiny model's labels: two messages cannot make 3 of the last 5 (the rule's default)
    assert trend["alert"] is None and trend["negative_share"] in (0.0, 0.5, 1.0)
    off = client.chat.completions.create(model="any", messages=messages, max_tokens=4, extra_body={"wellbeing": False})
    assert "wellbeing" not in off.model_extra and off.model_extra["sentiment"]["label"] in LABELS


@pytest.mark.parametrize("body, status, fragment", [
    (b"{not json", 400, "not valid JSON"),
    (b'{"model": "m"}', 400, "messages must be a non-empty list"),
    (b'{"messages": [{"role": "wizard", "content": "hi"}]}', 400, "role 'wizard'"),
    (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}', 400, "last"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}', 400, "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "n": 2}', 400, "n=1"),
])
def test_malformed_requests_get_openai_shaped_400s(server, body, status, fragment):
    r = httpx.post(server.url + "v1/chat/completions", content=body,
                   headers={"Authorization": "Bearer sesame", "Content-Type": "application/json"})
    assert r.status_code == status
    error = r.json()["error"]
    assert fragment in error["message"] and error["type"] == "invalid_request_error"


def test_the_official_client_raises_its_own_errors(client, server):
    with pytest.raises(openai.BadRequestError, match="context_length_exceeded|tokens"):
        ask(client, "长" * 5000, max_tokens=4)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "v1", api_key="wrong", max_retries=0).models.list()


def test_classify_endpoint_takes_one_text_or_a_list(server):
    headers = {"Authorization": "Bearer sesame"}
    one = httpx.post(server.url + "v1/classify", json={"input": "太好了"}, headers=headers).json()
    many = httpx.post(server.url + "v1/classify", json={"input": ["太好了", "太差了", "一般"], "labels": "en"},
                      headers=headers).json()
    assert [d["index"] for d in many["data"]] == [0, 1, 2]
    assert one["data"][0]["label"] in LABELS and {d["label"] for d in many["data"]} <= {"Positive", "Negative"}
    bad = httpx.post(server.url + "v1/classify", json={"input": []}, headers=headers)
    assert bad.status_code == 400


def test_health_is_open_and_reports_the_load(server):
    h = httpx.get(server.url + "health").json()
    assert h["status"] == "ok" and h["slots"] == 4 and h["streams"] == 0


@pytest.mark.parametrize("clients", [8, 32])
def test_concurrent_streaming_clients_each_get_their_whole_own_answer(client, clients):
    texts = [f"第{i}位用户：" + "今天" * (i % 7 + 1) + ("很开心" if i % 2 else "很难过") for i in range(clients)]
    alone = {t: ask(client, t, max_tokens=8, temperature=0) for t in texts[:4]}

    def stream(t):
        chunks = list(ask(client, t, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}))
        return ("".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
                chunks[0].model_extra["sentiment"], chunks[-1].usage, chunks[-2].choices[0].finish_reason)

    with ThreadPoolExecutor(clients) as pool:
        results = dict(zip(texts, pool.map(stream, texts)))
    same = 0
    for t, (text, sentiment, usage, finish) in results.items():
        assert usage.completion_tokens in range(1, 9) and finish == ("length" if usage.completion_tokens == 8 else "stop")
        assert sentiment["label"] in LABELS
        if t in alone:      # its own answer: the prompt it was given, and (up to rounding) the reply it gets alone
            assert usage.prompt_tokens == alone[t].usage.prompt_tokens
            assert sentiment["label"] == alone[t].model_extra["sentiment"]["label"]
            same += text == alone[t].choices[0].message.content
    # batched kernels round differently, which can flip a near-tie of the random model's greedy choice
    assert same >= len(alone) - 1
    assert len({u.prompt_tokens for _, _, u, _ in results.values()}) > 1


def test_a_client_that_goes_away_frees_its_slot(server):
    headers = {"Authorization": "Bearer sesame"}
    body = {"messages": [{"role": "user", "content": "讲一个很长的故事"}], "max_tokens": 400, "stream": True,
            "temperature": 1.5}
    with httpx.stream("POST", server.url + "v1/chat/completions", json=body, headers=headers, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        busy = httpx.get(server.url + "health").json()["streams"]
    # the connection is closed here; the worker must cancel the reply instead of running to max_tokens: wait
    # for the app to report it (its log line), not for a number of seconds
    deadline = time.monotonic() + 60
    while "client went away" not in server.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    while httpx.get(server.url + "health").json()["streams"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert busy == 1 and httpx.get(server.url + "health").json()["streams"] == 0
    assert "client went away" in server.output()


# -- error mapping, on a fake runtime ---------------------------------------------------------------------------
class RefusingBot(FakeRuntime):
    load = {"waiting": 0, "streams": 0, "slots": 1, "max_queue": 1}

    def __init__(self, error):
        self.error = error

    def classify(self, text, labels=None):
        raise self.error

    def respond(self, text, history=None, labels=None, temperature=None, max_tokens=None, seed=None, **options):
        raise self.error


@pytest.mark.parametrize("error, status, header", [
    (QueueFull("9 requests are already waiting"), 503, "Retry-After"),
    (ContextOverflow(5000, 128, 1800), 400, None),
    (ValueError("text is empty"), 400, None),
])
def test_runtime_errors_map_to_http_statuses(error, status, header):
    app = FastAPI()
    app.include_router(build_router(lambda: RefusingBot(error), lambda: "fake.gguf"))
    r = TestClient(app).post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == status and str(error) in r.json()["error"]["message"]
    assert header is None or r.headers[header] == "2"
    if isinstance(error, ContextOverflow):
        assert r.json()["error"]["code"] == "context_length_exceeded" and "5000" in r.json()["error"]["message"]


def test_health_is_503_while_the_model_loads():
    app = FastAPI()
    app.include_router(build_router(lambda: None, lambda: "fake.gguf", is_ready=lambda: False))
    c = TestClient(app)
    assert c.get("/health").status_code == 503
    r = c.post("/v1/classify", json={"input": "hi"})
    assert r.status_code == 503 and r.headers["Retry-After"] == "2"
