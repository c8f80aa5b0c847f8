"""Both roles on a Qwen3 model (tiny, random weights, Qwen3's real chat template): thinking off by default, so
the sentiment label is the first generated token and no <think> text ever reaches a user; thinking on when asked.
"""
from __future__ import annotations

import gguf
import openai
import pytest

from allinone_gguf import AllInOne
from allinone_gguf.runtime.chat import ChatTemplate
from allinone_gguf.runtime.prompts import LABEL_SETS
from app_server import running_app


def template_of(path) -> str:
    field = gguf.GGUFReader(path).fields["tokenizer.chat_template"]
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def test_the_template_closes_an_empty_think_block_unless_thinking_is_on(tiny_qwen3_models):
    source = template_of(tiny_qwen3_models["Q4_K_M"])
    off, on = ChatTemplate(source), ChatTemplate(source, thinking=True)
    assert off.has_thinking
    turn = [("system", "你是助手。"), ("user", "你好")]
    assert off.render_text(turn, generation=True).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert on.render_text(turn, generation=True).endswith("<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def bot(tiny_qwen3_models):
    with AllInOne(tiny_qwen3_models["Q4_K_M"], n_threads=1, n_ctx=1024, max_tokens=24, sentiment_cache=0) as b:
        yield b


def test_classify_and_reply_on_qwen3(bot):
    for lang in LABEL_SETS:
        s = bot.classify("今天的实验终于成功了，太棒了！", labels=lang)
        assert s.label in LABEL_SETS[lang] and 0.5 <= s.confidence <= 1
    stream = bot.stream_reply("今天的实验终于成功了！", sentiment=s, seed=1)
    reply = "".join(stream)
    assert "<think>" not in reply and "</think>" not in reply
    assert stream.usage["completion_tokens"] >= 1
    many = bot.classify_many(["好", "差", "一般般"])
    assert [m.label for m in many] == [bot.classify(t).label for t in ("好", "差", "一般般")]


def test_a_second_turn_reuses_the_first_on_qwen3(bot):
    r1 = bot.reply("我叫小明。", seed=2, conversation="q3")
    stream = bot.stream_reply("我叫什么？", history=[{"role": "user", "content": "我叫小明。"},
                                                  {"role": "assistant", "content": r1}], seed=3, conversation="q3")
    "".join(stream)
    assert stream.usage["cached_tokens"] > 10


def test_thinking_may_be_allowed_and_stays_hidden(tiny_qwen3_models):
    # Random weights never think on their own: a grammar makes the model write a thinking block, token by token
    # (<think> is one token of Qwen3's vocabulary), so the filter has something to hide.
    thinking = 'root ::= "<think>" "\\n让我想想" "</think>" "\\n\\n" "你好"'
    with AllInOne(tiny_qwen3_models["Q8_0"], n_threads=1, n_ctx=1024, max_tokens=16, thinking=True) as b:
        assert b.reply("你好", seed=1, grammar=thinking, max_tokens=64) == "你好"   # any tokenization: bytes too
        with b.stream_reply("你好", seed=1, grammar=thinking, max_tokens=64) as stream:
            pieces = list(stream)
        assert stream.usage["completion_tokens"] >= 4 and "".join(pieces) == "你好"


def test_the_api_serves_qwen3_without_think_text(tiny_qwen3_models):
    model = tiny_qwen3_models["Q4_K_M"]
    with running_app(model, model.parent, "--n-threads", "1") as server:
        client = openai.OpenAI(base_url=server.url + "v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(model="qwen3", messages=[{"role": "user", "content": "你好呀"}],
                                           max_tokens=12)
        assert "<think>" not in r.choices[0].message.content
        assert r.model_extra["sentiment"]["label"] in LABEL_SETS["zh"]
