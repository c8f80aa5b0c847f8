"""The app's HTTP API through gradio_client, against the real server (`python app.py`) on the tiny model."""
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from app_server import ROOT, running_app

LABELS = {"zh": {"正面", "负面"}, "en": {"Positive", "Negative"}}
CLIENTS = 8


@pytest.fixture(scope="module")
def server(tiny_models):
    with running_app(tiny_models["Q4_K_M"], tiny_models["Q4_K_M"].parent, "--n-threads", "1") as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return Client(server.url, verbose=False)


def test_only_the_two_named_endpoints_are_public(client):
    api = client.view_api(print_info=False, return_format="dict")
    assert set(api["named_endpoints"]) == {"/classify", "/respond"}
    assert not api["unnamed_endpoints"]
    params = [p["parameter_name"] for p in api["named_endpoints"]["/respond"]["parameters"]]
    assert params[:2] == ["text", "history"]


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_classify_returns_a_label_and_its_confidence(client, lang):
    label, confidence = client.predict("今天的实验终于成功了，太棒了！", lang, api_name="/classify")
    assert label in LABELS[lang]
    assert isinstance(confidence, float) and 0.5 <= confidence <= 1.0   # the label's own probability


def test_respond_returns_sentiment_and_the_full_reply(client):
    history = [{"role": "user", "content": "我今天面试了"}, {"role": "assistant", "content": "结果怎么样？"}]
    label, confidence, reply = client.predict("还在等通知，有点紧张", history, "zh", 0.7, 16, 7,
                                              api_name="/respond")
    assert label in LABELS["zh"] and 0.5 <= confidence <= 1.0
    assert isinstance(reply, str) and reply.strip()
    assert "情感判断" not in reply  # the badge is the UI's, not part of the API reply


def test_empty_text_is_a_clear_error(client):
    with pytest.raises(AppError, match="text is empty"):
        client.predict("   ", api_name="/classify")
    with pytest.raises(AppError, match="text is empty"):
        client.predict("", [], api_name="/respond")


def test_eight_concurrent_clients_each_get_their_own_answer(server, client):
    """Same text gives the same answer alone and in a crowd, up to rounding: nothing lost, nothing mixed up.

    Greedy (temperature 0): in a crowd, replies decode together in one batch, whose kernels round the last float
    bits differently from a batch of one; sampling at a temperature from the tiny random model's nearly flat
    distribution would turn that rounding into other tokens, so the check would be about floats, not about
    answers reaching the right client."""
    texts = [f"{topic}（第{i}位）" for i, topic in enumerate(
        ["考试终于过了", "钱包丢了", "猫咪生病了", "升职加薪啦", "下雨又堵车", "朋友来看我", "手机摔坏了", "旅行真开心"])]
    args = dict(history=[], labels="zh", temperature=0.0, max_tokens=12, seed=1234, api_name="/respond")
    alone = [client.predict(text, **args) for text in texts]
    assert len({reply for _, _, reply in alone}) > 1, "replies do not depend on the text; the check below is void"

    def ask(text):
        return Client(server.url, verbose=False).predict(text, **args)

    with ThreadPoolExecutor(CLIENTS) as pool:
        futures = [pool.submit(ask, text) for text in texts]
        crowd = [future.result(timeout=600) for future in futures]
    same = 0
    for text, (label, confidence, reply), (label0, confidence0, reply0) in zip(texts, crowd, alone):
        assert label == label0 and confidence == pytest.approx(confidence0, abs=1e-3), text
        assert reply.strip(), text
        same += reply == reply0
    # Rounding flips a near-tie of the random model now and then (seen: 1 of 8); a mix-up would leave few alike.
    assert same >= len(texts) - 2, [(c[2], a[2]) for c, a in zip(crowd, alone)]
    assert server.alive()
    assert client.predict("还在吗？", api_name="/classify")[0] in LABELS["zh"]


def test_a_missing_model_is_one_clear_line_and_a_public_host_one_warning(tmp_path):
    # The model check fails before anything binds, so asking for 0.0.0.0 here opens no port.
    r = subprocess.run([sys.executable, "app.py", "--model", str(tmp_path / "nope.gguf"), "--host", "0.0.0.0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in r.stderr
    assert lines[0].startswith("warning: binding to 0.0.0.0") and "no login" in lines[0]
    assert lines[1].startswith("error: ") and "nope.gguf" in lines[1] and "make models" in lines[1]


@pytest.mark.slow
def test_the_proxy_model_answers_sensibly_through_the_api(proxy_model, tmp_path):
    """The real 0.5B stand-in (a coder model) behind the same API: clear-cut texts, a Chinese reply."""
    with running_app(proxy_model, tmp_path, "--n-threads", "2") as server:
        client = Client(server.url, verbose=False)
        assert client.predict("今天的实验终于成功了，太棒了！", api_name="/classify")[0] == "正面"
        assert client.predict("Lost my wallet today, I feel awful.", "en", api_name="/classify")[0] == "Negative"
        label, confidence, reply = client.predict("考试没过，我好难过。", [], "zh", 0.7, 48, 1, api_name="/respond")
        assert label == "负面" and confidence > 0.5
        assert re.search(r"[\u4e00-\u9fff]", reply), reply
