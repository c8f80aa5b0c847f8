"""The wellbeing watch inside the app (issue 21 item 2), below the page: the runtime's `care` option on the fake
backend of test_runtime_logic.py (the prompt without it is the one from before, token for token), and the API's
`wellbeing` object against a fake runtime. The page's note and its check-ins: test_app_logic.py.
"""
from __future__ import annotations

import json
import os
import re

import pytest
from conftest import FakeRuntime
from fastapi import FastAPI
from fastapi.testclient import TestClient
from test_runtime_logic import FakeBot as FakeModel, backend, held_text

from allinone_gguf import AllInOne, Sentiment
from allinone_gguf.faces.defaults import AppSettings
from allinone_gguf.faces.openai_api import build_router
from allinone_gguf.runtime.prompts import CARE_SYSTEM, CHAT_SYSTEM, LABEL_SETS, SENTIMENT_CUE
from allinone_gguf.faces.care import check_in
from allinone_gguf.wellbeing import AlertRule, Message

NEGATIVE, POSITIVE = SENTIMENT_CUE["zh"][1], SENTIMENT_CUE["zh"][0]


@pytest.fixture
def model():
    with FakeModel("fake.gguf", n_threads=1, n_ctx=2048, sentiment_prompt="seed") as m:
        yield m


def prompt_of(model, stream) -> str:
    """The prompt a finished reply was decoded from (its slot holds it, then the sampled tokens)."""
    "".join(stream)
    _, tokens = backend(model).decodes[-1]
    return held_text(tokens[:stream.usage["prompt_tokens"]])


def chatml(user_turn: str, lang: str = "zh", care: bool = False) -> str:
    """The fake's rendering of a one-turn prompt: ChatML with its special tokens shown as |; with `care`, the
    check-in system turn right before the user's."""
    check_in = f"|system\n{CARE_SYSTEM[lang]}|\n" if care else ""
    return f"|system\n{CHAT_SYSTEM[lang]}|\n{check_in}|user\n{user_turn}|\n|assistant\n"


# -- the runtime's care option -------------------------------------------------------------------------------------
def test_without_care_the_prompt_is_token_for_token_the_one_before_the_watch(model):
    s = model.classify("差差")
    assert prompt_of(model, model.stream_reply("差差", sentiment=s, conversation="a")) == chatml("差差" + NEGATIVE)
    assert prompt_of(model, model.stream_reply("差差", sentiment=s, care=False, conversation="b")) == \
        chatml("差差" + NEGATIVE)
    assert prompt_of(model, model.respond("好好", care=False, conversation="c")) == chatml("好好" + POSITIVE)
    assert prompt_of(model, model.respond("好好", conversation="d")) == chatml("好好" + POSITIVE)
    assert prompt_of(model, model.stream_reply("你好", conversation="e")) == chatml("你好")


def test_care_puts_the_check_in_turn_right_before_the_user_turn(model):
    s = model.classify("差差")
    assert prompt_of(model, model.stream_reply("差差", sentiment=s, care=True)) == chatml("差差" + NEGATIVE, care=True)
    assert prompt_of(model, model.stream_reply("你好", care=True)) == chatml("你好", care=True)
    assert prompt_of(model, model.respond("Bad day 差", labels="en", care=True)) == \
        chatml("Bad day 差" + SENTIMENT_CUE["en"][1], "en", care=True)


def test_the_check_in_is_for_this_turn_only_and_the_history_is_reused(model):
    """The next turn's prompt has the earlier turns without their check-in (one at a time, before the newest user
    turn); the slot keeps what it can and decodes from the check-in on."""
    s = model.classify("差差")
    first = model.reply("差差", sentiment=s, care=True, conversation="c")
    history = [{"role": "user", "content": "差差"}, {"role": "assistant", "content": first}]
    stream = model.stream_reply("还是差", history=history, sentiment=model.classify("还是差"), care=True,
                                conversation="c")
    prompt = prompt_of(model, stream)
    assert prompt.count(CARE_SYSTEM["zh"]) == 1 and prompt.index(CARE_SYSTEM["zh"]) > prompt.index(first)
    # the slot held the first turn's check-in right after the system prompt (and the <|im_start|> of the next turn)
    assert stream.usage["cached_tokens"] == len(f"|system\n{CHAT_SYSTEM['zh']}|\n|")


def test_respond_asks_a_care_function_once_the_label_is_read(model):
    b, asked = backend(model), []

    def care(sentiment):
        asked.append(sentiment)
        return sentiment.is_negative
    before = len(b.batches)
    with model.respond("差差差", care=care, conversation="x") as stream:
        assert prompt_of(model, stream) == chatml("差差差" + NEGATIVE, care=True)
    assert len(asked) == 1 and asked[0].label == "负面" and asked[0] == stream.sentiment()
    # nothing else streamed: the label's frame went first, then the reply's whole prompt, check-in and cue included
    assert len(b.batches[before]) == 1 and len(b.batches[before + 1]) == 1
    assert prompt_of(model, model.respond("好好好", care=care, conversation="y")) == chatml("好好好" + POSITIVE)


def test_a_failing_care_function_leaves_the_reply_without_the_check_in(model, caplog):
    def care(sentiment):
        raise RuntimeError("boom")
    assert prompt_of(model, model.respond("差差", care=care)) == chatml("差差" + NEGATIVE)
    assert "care(sentiment) failed" in caplog.text
    assert model.reply("还在吗")                               # the worker is fine


@pytest.mark.parametrize("lang", sorted(CARE_SYSTEM))
def test_the_check_in_names_no_label_score_or_detector(lang):
    words = [*LABEL_SETS["zh"], *LABEL_SETS["en"], "negative", "positive", "sentiment", "label", "score",
             "confidence", "alert", "detect", "标签", "分数", "置信", "情感", "检测", "预警", "%"]
    assert not [w for w in words if w.lower() in CARE_SYSTEM[lang].lower()]


def test_check_in_is_a_plain_answer_unless_the_label_decides_it():
    rule, strong = AlertRule(), [Message(i, None, True, 0.9) for i in range(3)]
    assert check_in([], 0, rule) is False and check_in(strong, 3, rule) is True      # holds whatever comes next
    care = check_in(strong[:2], 2, rule)                                            # a third one would fire it
    pos, neg = LABEL_SETS["zh"]
    assert callable(care) and care(Sentiment(neg, 0.9, {pos: 0.1, neg: 0.9}, (pos, neg))) is True
    assert care(Sentiment(neg, 0.7, {pos: 0.3, neg: 0.7}, (pos, neg))) is False       # below the rule's 0.8
    assert care(Sentiment(pos, 0.9, {pos: 0.9, neg: 0.1}, (pos, neg))) is False and care(None) is False


# -- the API's wellbeing object ------------------------------------------------------------------------------------
class FakeStream:
    def __init__(self, sentiment):
        self._sentiment, self._pieces = sentiment, iter(["好的", "。"])
        self.finish_reason, self.usage = None, {"prompt_tokens": 9, "completion_tokens": 2, "cached_tokens": 0}

    def wait_started(self):
        pass

    def sentiment(self):
        return self._sentiment

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self._pieces)
        except StopIteration:
            self.finish_reason = "stop"
            raise

    def logprobs(self, start=0):
        return []

    def cancel(self):
        pass

    def close(self):
        pass


class WatchedBot(FakeRuntime):
    """Labels a text with 难过 负面 95 %, with 累 负面 70 %, any other 正面 90 %; records what the watch asked of it."""
    load = {"waiting": 0, "streams": 0, "slots": 1}

    def __init__(self):
        self.batches, self.cares = [], []

    @staticmethod
    def label(text):
        p, negative = (0.95, True) if "难过" in text else (0.7, True) if "累" in text else (0.9, False)
        pos, neg = LABEL_SETS["zh"]
        return Sentiment(neg if negative else pos, p, {pos: 1 - p if negative else p, neg: p if negative else 1 - p},
                         (pos, neg))

    def classify_many(self, texts, labels=None):
        self.batches.append(list(texts))
        return [self.label(t) for t in texts]

    def respond(self, text, history=None, labels=None, temperature=None, max_tokens=None, seed=None, **options):
        sentiment, care = self.label(text), options.get("care", False)
        self.cares.append(care(sentiment) if callable(care) else care)    # as the runtime asks, once labelled
        return FakeStream(sentiment)


def api(bot, **router):
    app = FastAPI()
    app.include_router(build_router(lambda: bot, lambda: "fake.gguf", **router))
    return TestClient(app)


def conversation(*users: str) -> list[dict]:
    """A system message, then each user message answered by the assistant; the last user message unanswered."""
    out = [{"role": "system", "content": "你是助手"}]
    for text in users:
        out += [{"role": "user", "content": text}, {"role": "assistant", "content": "嗯嗯"}]
    return out[:-1]


def test_a_chat_reply_carries_the_trend_and_checks_in_while_the_alert_holds():
    bot = WatchedBot()
    r = api(bot).post("/v1/chat/completions", json={"messages": conversation("我好难过", "今天真好", "还是难过",
                                                                              "又难过了")}).json()
    # user messages sit at indices 1, 3, 5, 7 of `messages`; 3 of the last 4 count (>= 0.8), the rule's default
    assert r["wellbeing"] == {"negative_share": 0.75, "alert": {
        "since": 1, "reason": "3 of the last 4 messages negative with confidence >= 0.8", "messages": [1, 5, 7]}}
    assert bot.batches == [["我好难过", "今天真好", "还是难过"]] and bot.cares == [True]   # one batch, then care
    assert r["sentiment"]["label"] == "负面" and r["choices"][0]["message"]["content"] == "好的。"
    calm = api(bot).post("/v1/chat/completions", json={"messages": conversation("我好难过", "有点累")}).json()
    assert calm["wellbeing"] == {"negative_share": 0.5, "alert": None} and bot.cares[-1] is False   # 累 is 70 %


def test_the_first_stream_chunk_carries_the_trend():
    bot = WatchedBot()
    body = {"messages": conversation("难过", "难过", "难过"), "stream": True}
    with api(bot).stream("POST", "/v1/chat/completions", json=body) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert events[0]["wellbeing"]["alert"]["messages"] == [1, 3, 5] and bot.cares == [True]
    assert all("wellbeing" not in e for e in events[1:])


def test_a_client_or_the_app_can_turn_the_watch_off():
    bot = WatchedBot()
    body = {"messages": conversation("难过", "难过", "难过"), "wellbeing": False}
    r = api(bot).post("/v1/chat/completions", json=body).json()
    assert "wellbeing" not in r and bot.batches == [] and bot.cares == [False]   # nothing classified, no check-in
    r = api(bot, wellbeing=False).post("/v1/chat/completions", json={**body, "wellbeing": True}).json()
    assert "wellbeing" not in r and bot.batches == [] and bot.cares == [False, False]   # app.py --no-wellbeing
    bad = api(bot).post("/v1/chat/completions", json={**body, "wellbeing": "no"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "wellbeing"


def test_the_watch_reads_a_bounded_number_of_recent_user_messages():
    bot = WatchedBot()
    users = [f"第{i}句，难过" for i in range(30)]
    r = api(bot).post("/v1/chat/completions", json={"messages": conversation(*users)}).json()
    lookback = AppSettings().wellbeing_lookback
    assert lookback >= max(AlertRule().window, AlertRule().trend_window)
    assert bot.batches == [users[-lookback:-1]]                 # the lookback - 1 earlier ones, in one batch
    first = 1 + 2 * (30 - lookback)                             # the index in `messages` of the first one read
    assert r["wellbeing"]["alert"]["since"] == first and r["wellbeing"]["negative_share"] == 1.0
    blank = conversation("难过", "   ", "难过", "难过")        # a user message without text is not labelled
    r = api(bot).post("/v1/chat/completions", json={"messages": blank}).json()
    assert bot.batches[-1] == ["难过", "难过"] and r["wellbeing"]["alert"]["messages"] == [1, 5, 7]


# -- on the real stand-in ------------------------------------------------------------------------------------------
# Negative messages written for this test (none from the evaluation sets), and what counts as asking after the person.
HARD_TIMES = ["等了两个小时外卖还没到，气死了。", "手机用了三天就黑屏，售后还推卸责任。", "最近睡眠不太好，白天总是没精神。",
              "项目又被砍了，心里很难受。", "被领导当众批评了，好丢脸。", "房东突然说要涨房租，好烦。",
              "考试又没过，我是不是很没用。", "和朋友吵架了，一整天都不想说话。"]
ASKS_AFTER = re.compile(r"(你|您)[^。！？!?\n]{0,20}[？?]|愿意[^。]{0,8}(听|聊|陪)|陪(着)?你|聊聊")
NAMES_A_LABEL = re.compile("负面|正面|标签|分数|情绪分析")


@pytest.mark.slow
def test_on_the_stand_in_the_check_in_asks_after_the_person_and_is_not_repeated(proxy_model):
    """The figures beside prompts.CARE_SYSTEM: 8 negative messages, seeds 1-4, 64 tokens, with and without the
    check-in turn; replies that ask after the person, that repeat the instruction (any 8 characters of it), that
    name a label. One thread per core this process may use (taskset), as measured."""
    with AllInOne(proxy_model, n_threads=len(os.sched_getaffinity(0))) as bot:
        labels = bot.classify_many(HARD_TIMES)
        replies = {care: [bot.reply(text, sentiment=s, seed=seed, max_tokens=64, care=care)
                          for seed in (1, 2, 3, 4) for text, s in zip(HARD_TIMES, labels)] for care in (False, True)}
    asked = {care: sum(bool(ASKS_AFTER.search(r)) for r in found) for care, found in replies.items()}
    note = CARE_SYSTEM["zh"]
    repeated = [r for r in replies[True] if any(note[i:i + 8] in r for i in range(len(note) - 7))]
    named = [r for r in replies[True] if NAMES_A_LABEL.search(r)]
    print(f"asked after the person: {asked[True]} of 32 with the check-in, {asked[False]} of 32 without; "
          f"repeated the instruction: {len(repeated)}; named a label: {len(named)}")
    assert asked[True] >= asked[False] + 4 and not repeated and len(named) <= 2, (asked, repeated, named)
