"""Slow checks on the real 0.5B proxy (Qwen2.5-Coder-0.5B-Instruct Q4_K_M, a stand-in for Qwen1.5-0.5B-Chat).

Skipped with the reason shown when the proxy file is absent (../shared/tools/proxy-model.sh makes it).
The sentences are written for this test, not taken from the evaluation sets.
"""
from __future__ import annotations

import re

import pytest

from allinone_gguf import AllInOne

pytestmark = pytest.mark.slow

CLEAR = [
    ("今天的实验终于成功了，太棒了！", "正面"),
    ("这家店的菜又好吃又实惠，强烈推荐。", "正面"),
    ("客服态度特别好，问题很快就解决了。", "正面"),
    ("孩子考上了理想的大学，全家都很开心。", "正面"),
    ("酒店位置好，房间干净，早餐丰富。", "正面"),
    ("等了两个小时外卖还没到，气死了。", "负面"),
    ("手机用了三天就黑屏，售后还推卸责任。", "负面"),
    ("房间又脏又吵，再也不会住了。", "负面"),
    ("这本书写得乱七八糟，浪费时间。", "负面"),
    ("项目又被砍了，心里很难受。", "负面"),
]


@pytest.fixture(scope="module")
def bot(proxy_model):
    with AllInOne(proxy_model, n_threads=2, sentiment_cache=0) as b:      # compares decodes of the same text
        yield b


def test_clear_sentences_are_classified_right(bot):
    wrong = [(t, g) for t, g in CLEAR if bot.classify(t).label != g]
    assert len(wrong) <= 1, wrong


def test_english_labels(bot):
    assert bot.classify("What a wonderful day, I love it!", labels="en").label == "Positive"
    assert bot.classify("This is the worst service I have ever had.", labels="en").label == "Negative"


def test_injection_flips_on_the_clear_sentences_are_what_the_readme_says(bot, proxy_model):
    """README "Prompt injection": an appended instruction decides the label almost every time with the default
    prompt, and `guarded` only partly resists. Measured here on CLEAR (all ten right when clean): fewshot
    flips 10 of 10, guarded 5 of 10 (the five negatives hold)."""
    from allinone_gguf.measure.evaluate import INJECTION

    def flips(b) -> int:
        return sum(b.classify(text + INJECTION["zh"].format(label="负面" if gold == "正面" else "正面")).label != gold
                   for text, gold in CLEAR)

    default = flips(bot)
    with AllInOne(proxy_model, n_threads=2, sentiment_prompt="guarded") as guarded_bot:
        guarded = flips(guarded_bot)
    assert default >= 8 and guarded <= 7 and guarded < default, (default, guarded)


def test_reply_is_chinese_text_that_stops(bot):
    s = bot.classify("今天的实验终于成功了，太棒了！")
    reply = bot.reply("今天的实验终于成功了，太棒了！", sentiment=s, seed=1, max_tokens=48)
    assert re.search(r"[\u4e00-\u9fff]", reply)
    assert "<|im_end|>" not in reply and "<|im_start|>" not in reply


def test_multi_turn_decodes_only_the_new_turn_after_another_users_turn(bot):
    """KV reuse on the real model, proven by llama.cpp's own decoded-token counter."""
    text1, text2 = "我叫小明，今天心情不好。", "你还记得我叫什么吗？"
    r1 = bot.reply(text1, sentiment=bot.classify(text1), seed=2, max_tokens=32, conversation="ming")
    bot.reply("Write a haiku about autumn.", seed=3, max_tokens=16, conversation="other")   # another user between
    history = [{"role": "user", "content": text1}, {"role": "assistant", "content": r1}]
    s2 = bot.classify(text2)
    before = bot.stats()["decoded_tokens"]
    stream = bot.stream_reply(text2, history=history, sentiment=s2, seed=4, max_tokens=8, conversation="ming")
    "".join(stream)
    decoded = bot.stats()["decoded_tokens"] - before
    new = stream.usage["prompt_tokens"] - stream.usage["cached_tokens"]
    assert stream.usage["cached_tokens"] >= bot.count_tokens(text1) + bot.count_tokens(r1)
    assert new <= bot.count_tokens(text2) + 30             # the new turn, its cue and template tokens
    assert decoded <= new + stream.usage["completion_tokens"]


ECHO_MESSAGES = ["今天的实验终于成功了，太棒了！", "等了两个小时外卖还没到，气死了。", "孩子考上了理想的大学，全家都很开心。",
                 "手机用了三天就黑屏，售后还推卸责任。", "周末和朋友去爬山，风景特别好。", "最近睡眠不太好，白天总是没精神。",
                 "面试通过了，下周一就去新公司报到！", "项目又被砍了，心里很难受。", "第一次做蛋糕就成功了，好有成就感。",
                 "被领导当众批评了，好丢脸。", "收到了老朋友寄来的明信片。", "房东突然说要涨房租，好烦。"]
# A note in brackets about the mood or the label, as the cue was once echoed: "…（检测到“正面”情绪）".
CUE_ECHO = re.compile(r"[（(【\[][^）)】\]]{0,16}(情绪|检测|心情|正面|负面)[^）)】\]]{0,16}[）)】\]]")


def test_replies_do_not_echo_the_sentiment_cue(bot):
    """Issue 13, bug 6: count cue echoes over a fixed set (measured 0 of 48 with the current cue, 1 of 48 with
    the old "（检测到“…”情绪）"; four seeds there, one here to keep the suite short)."""
    echoes = []
    for text, s in zip(ECHO_MESSAGES, bot.classify_many(ECHO_MESSAGES)):
        reply = bot.reply(text, sentiment=s, seed=1, max_tokens=64)
        if CUE_ECHO.search(reply) or s.label in reply:
            echoes.append(reply)
    assert len(echoes) <= 1, echoes


def test_json_schema_replies_parse_and_validate_on_the_real_model(bot):
    """Structured outputs (response_format json_schema on the API): the schema's grammar keeps a real model's
    reply inside it, so every reply that ends parses and has the schema's fields and types."""
    import json

    from allinone_gguf.runtime import json_grammar
    schema = {"type": "object", "additionalProperties": False, "required": ["sentiment", "urgent"],
              "properties": {"sentiment": {"enum": ["positive", "negative"]}, "urgent": {"type": "boolean"}}}
    grammar = json_grammar(schema)
    for seed, (text, gold) in enumerate(CLEAR[:5] + CLEAR[5:8]):
        with bot.stream_reply(text, grammar=grammar, max_tokens=64, seed=seed) as stream:
            reply = "".join(stream)
        assert stream.finish_reason == "stop", reply
        value = json.loads(reply)
        assert set(value) == {"sentiment", "urgent"} and isinstance(value["urgent"], bool), reply
        assert value["sentiment"] in ("positive", "negative")


def test_respond_gives_the_labels_and_confidences_classify_gives(bot):
    """respond() decodes the text's frame in the same batches as the reply's prompt (other batch shapes, so other
    float rounding): the labels are the same and the confidences agree to 1e-3 (issue 18's bound)."""
    for seed, (text, _) in enumerate(CLEAR):
        alone = bot.classify(text)
        with bot.respond(text, max_tokens=2, seed=seed) as stream:
            together = stream.sentiment()
            "".join(stream)
        assert together.label == alone.label and abs(together.confidence - alone.confidence) <= 1e-3, text


@pytest.mark.parametrize("bias", [50.0, -50.0], ids=["positive", "negative"])
def test_respond_continues_from_the_cue_its_label_picked(proxy_model, bias):
    """respond() decodes the prompt's cue once the label is read. The reply's second token is computed from the
    slot's cells: its log probability must match a reply given that label's cue, not the other's (bias forces the
    label)."""
    import dataclasses
    text = "这家店的菜太难吃了，再也不来了。"

    def second(bot, **kw):
        with (bot.respond(text, **kw) if "sentiment" not in kw else bot.stream_reply(text, **kw)) as stream:
            "".join(stream)
            return stream, [t.logprob for t in stream.logprobs()]
    opts = dict(max_tokens=2, temperature=0, logprobs=1)
    with AllInOne(proxy_model, n_threads=2, sentiment_cache=0, sentiment_bias=bias) as bot:
        stream, got = second(bot, **opts)
    label = stream.sentiment()
    assert label.is_positive == (bias > 0)
    flipped = dataclasses.replace(label, label=label.labels[0 if bias < 0 else 1])
    with AllInOne(proxy_model, n_threads=2, sentiment_cache=0) as plain:
        right = second(plain, sentiment=label, **opts)[1]
        wrong = second(plain, sentiment=flipped, **opts)[1]
    assert abs(got[1] - right[1]) < abs(got[1] - wrong[1]) / 3, (got, right, wrong)
