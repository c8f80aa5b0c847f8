"""The part of `make bench` that runs inside one model's own process, so its memory figures are its own.

`measure/bench.py` writes a job (JSON: settings, sample texts, the labeled rows) and starts
`python -m allinone_gguf bench --worker JOB RESULT` once per model file; this module loads the model, leaves
out a warm-up, times every phase and writes RESULT. It uses the runtime's public API only; token counts come
from llama.cpp's own counters (`AllInOne.stats()`):

    python -m allinone_gguf bench --worker job.json result.json

The message texts were written for this file (none comes from an evaluation set): twelve short (≈22 chars)
and twelve medium (≈85 chars) messages, half positive and half negative; a long message (≈430 chars) is five
medium messages of the same mood in a row. The timing helpers (`percentile`, `latency_summary`, `memory_mb`)
are also the baseline's (measure/baseline.py), so they need nothing but the standard library.
"""
from __future__ import annotations

import json
import logging
import statistics
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

SHORT = (
    "今天的实验终于成功了，熬了三个通宵，太开心了！", "外卖又送晚了一个小时，饭菜全凉了，真让人生气。",
    "这家店的服务员特别热情，下次还会带朋友再来。", "面试又没通过，感觉自己什么都做不好，好累啊。",
    "新买的耳机音质很好，降噪效果也超出了我的预期。", "排了两个小时的队，结果被告知今天的号已经发完了。",
    "孩子第一次自己骑车去上学，我心里又骄傲又欣慰。", "房东突然要涨房租，还只给一周时间考虑，太过分了。",
    "周末和家人去爬山，天气晴朗，风景美得像一幅画。", "手机刚买三天就黑屏了，客服还一直推卸责任。",
    "老师表扬了我的作文，说写得真诚又有画面感。", "连续加班一个月，项目还是被砍掉了，白忙一场。",
)
MEDIUM_POSITIVE = (
    "这次搬家找的师傅非常专业，提前到了不说，家具都用保护膜仔细包好，搬运过程中一点磕碰都没有。最后还帮我们把床和"
    "柜子装好了，收费也和报价一样，没有临时加价，真心推荐给需要搬家的朋友。",
    "最近开始每天早起跑步，坚持了一个月，体重降了四公斤，晚上睡得也比以前踏实多了。虽然刚开始很辛苦，但现在已经习惯"
    "了，感觉整个人都更有精神，工作效率也提高了不少。",
    "朋友推荐的这本小说真的太好看了，情节环环相扣，人物刻画也很细腻，我一个周末就读完了。尤其是结尾的反转，完全出乎"
    "意料却又合情合理，读完之后好久都没缓过神来。",
    "第一次带爸妈出国旅行，虽然行程安排得有点紧，但他们一路上都特别开心，拍了好多照片。看到爸妈像孩子一样兴奋地尝试"
    "各种当地小吃，我觉得之前加班攒钱的辛苦都值了。",
    "社区新开了一家图书馆，环境安静明亮，书的种类也很丰富，还有专门给小朋友的阅读区。工作人员很耐心地教老人用电子借"
    "阅机，周末带孩子来看书已经成了我们家的固定活动。",
    "今天在地铁上有位年轻人主动给一位抱着孩子的妈妈让座，还帮她拿了行李。车厢里的人都向他投去赞许的目光，这样的小事"
    "让我觉得这个城市还是很温暖的，心情一下子就好了起来。",
)
MEDIUM_NEGATIVE = (
    "在网上订的酒店和图片完全不一样，房间又小又潮，墙角还有霉斑，空调开了一晚上都不制冷。找前台反映，对方态度冷淡，"
    "只说旺季没有别的房间可换，这次出差的心情全被毁了。",
    "孩子的学校临时通知要交一大笔资料费，也没有说明具体用途。问了班主任，回答含含糊糊，家长群里大家都很有意见，可谁"
    "也不敢多说，总觉得这样的做法很不透明，让人心里不舒服。",
    "公司新来的领导一上任就改了所有的流程，每天开三四个会，真正干活的时间反而少了。提了几次意见都被当成不配合，现在"
    "组里的人都在偷偷找下家，气氛压抑得让人喘不过气。",
    "网购的冰箱送来时外壳有明显凹痕，联系卖家要求换货，对方让我自己拍视频、写说明，来回折腾了一个多星期还没有结果。"
    "客服每次都说在处理中，这种购物体验实在太糟糕了。",
    "装修队说好一个月完工，结果拖了三个月还没弄完，墙面刷得坑坑洼洼，水管还漏水。每次打电话催，负责人都说马上来，却"
    "总是不见人影，现在每天都在为这件事发愁。",
    "报名参加的线上课程内容和宣传的差别太大，讲师只是照着课件念，提问也没人回复。想申请退款，平台却说已经超过七天无"
    "法处理，花了一千多块钱，感觉自己被骗了。",
)


# Each timed run classifies a different sample text, so a length has at most this many runs.
MAX_RUNS = len(SHORT)
# New tokens of a timed reply in every bench (make bench's turns, bench_serving's streams, bench_messages' replies).
REPLY_TOKENS = 64


def sample_texts() -> dict[str, list[str]]:
    """{"short": 12 texts, "medium": 12, "long": 12}, alternating positive and negative."""
    medium = [t for pair in zip(MEDIUM_POSITIVE, MEDIUM_NEGATIVE) for t in pair]
    long = []
    for i in range(6):
        for group in (MEDIUM_POSITIVE, MEDIUM_NEGATIVE):
            long.append("".join((group[i:] + group[:i])[:5]))
    return {"short": list(SHORT), "medium": medium, "long": long}


def memory_mb() -> dict[str, float]:
    """Resident set size now (VmRSS) and its peak so far (VmHWM) of this process, in MiB (Linux)."""
    found = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    found[key] = int(value.split()[0]) / 1024  # the file says kB
    except OSError:
        pass
    return {"rss_mb": found.get("VmRSS", float("nan")), "peak_rss_mb": found.get("VmHWM", float("nan"))}


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (q in 0..100) of every bench's figures: linearly interpolated between the two nearest
    ranks, as numpy's default ("linear"), so p50 of an even count is the mean of the middle two; NaN when empty."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def latency_summary(seconds: list[float], texts: list[str]) -> dict:
    ms = [s * 1000 for s in seconds]
    return {"n": len(ms), "p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95),
            "mean_ms": statistics.fmean(ms) if ms else float("nan"),
            "mean_chars": statistics.fmean(len(t) for t in texts) if texts else 0}


def canonical_label(label: str) -> str:
    """正面/负面 for any label language; anything else unchanged (so it counts as an invalid output)."""
    from ..scoring import normalise_gold
    try:
        return normalise_gold(label)
    except ValueError:
        return str(label)


def _turn(bot, text: str, history: list[dict], reply_tokens: int, seed: int) -> dict:
    """One app turn: classify, then a streamed reply of at most reply_tokens; every phase timed. The reply's
    tokens are llama.cpp's counts over the reply: prompt tokens (decoded in batches) and generated tokens
    (decoded one at a time)."""
    t0 = time.perf_counter()
    s = bot.classify(text)
    t1 = time.perf_counter()
    before = bot.stats()
    first, pieces = None, []
    for piece in bot.stream_reply(text, history=history, sentiment=s, max_tokens=reply_tokens, seed=seed):
        if first is None:
            first = time.perf_counter()
        pieces.append(piece)
    t2 = time.perf_counter()
    after = bot.stats()
    reply = "".join(pieces)
    history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
    return {"classify_s": t1 - t0, "ttft_s": (first or t2) - t1, "reply_s": t2 - t1, "turn_s": t2 - t0,
            "pieces": len(pieces), "prompt_tokens": after["prompt_tokens"] - before["prompt_tokens"],
            "gen_tokens": after["single_tokens"] - before["single_tokens"]}


def _reply_summary(turns: list[dict]) -> dict:
    """Medians of the turns; token rates over all turns, tokens counted by llama.cpp and timed by our clock as a
    user sees them: prompt tokens / time to the first piece, generated tokens / time from the first piece to
    the end of the reply."""
    gen_s = sum(t["reply_s"] - t["ttft_s"] for t in turns)
    prompt_s = sum(t["ttft_s"] for t in turns)
    gen_tokens, prompt_tokens = sum(t["gen_tokens"] for t in turns), sum(t["prompt_tokens"] for t in turns)
    return {"turns": len(turns),
            "ttft_ms_p50": percentile([t["ttft_s"] * 1000 for t in turns], 50),
            "turn_s_p50": percentile([t["turn_s"] for t in turns], 50),
            "turn_s_mean": statistics.fmean(t["turn_s"] for t in turns),
            "token_counts": "llama.cpp context counters", "tokens_per_reply": 1 + gen_tokens / len(turns),
            "prompt_tokens_per_reply": prompt_tokens / len(turns),
            "prompt_tokens_per_s": prompt_tokens / prompt_s if prompt_s > 0 else None,
            "gen_tokens_per_s": gen_tokens / gen_s if gen_s > 0 else None}


def classify_dataset(classify, texts: list[str], desc: str = "") -> tuple[list[str], float]:
    """(predicted labels, seconds) for every text; `classify` maps a text to a label string."""
    from tqdm import tqdm
    start = time.perf_counter()
    predicted = []
    for text in tqdm(texts, desc=f"  [worker] {desc}", unit="text", file=sys.stderr, leave=False,
                     disable=not desc, mininterval=1.0):
        try:
            predicted.append(classify(text))
        except ValueError as exc:  # e.g. an empty text in a data set: counted as an invalid output
            predicted.append(f"error: {exc}")
    return predicted, time.perf_counter() - start


def run_job(job: dict) -> dict:
    """Every measurement of one model file, as described in allinone_gguf.bench."""
    import importlib.metadata

    from ..runtime import AllInOne
    before = memory_mb()
    start = time.perf_counter()
    bot = AllInOne(job["model"], **job["settings"])
    result = {"engine": f"llama.cpp (llama-cpp-python {importlib.metadata.version('llama-cpp-python')})",
              "load": {"seconds": time.perf_counter() - start, "rss_before_mb": before["rss_mb"]}}
    result["load"].update({k + "_after_load": v for k, v in memory_mb().items()})
    texts, seed, reply_tokens = job["texts"], job["seed"], job["reply_tokens"]
    with bot:
        log.info("warm-up")
        for kind in texts:
            result["sentiment_source"] = bot.classify(texts[kind][-1]).source   # grammar or adapter
        adapter = bot.sentiment_adapter
        result["sentiment_adapter"] = adapter.path.name if adapter else None
        bot.reply(texts["short"][0], max_tokens=8, seed=seed)
        alone = {}
        for kind, items in texts.items():
            log.info("sentiment alone: %s", kind)
            items = items[: job["runs"]]
            times = []
            for text in items:
                t0 = time.perf_counter()
                bot.classify(text)
                times.append(time.perf_counter() - t0)
            alone[kind] = latency_summary(times, items)
        interleaved, turns = {}, []
        for kind, items in texts.items():
            log.info("interleaved with chat turns: %s", kind)
            items, history = items[: job["turns"]], []
            kind_turns = [_turn(bot, text, history, reply_tokens, seed) for text in items]
            interleaved[kind] = latency_summary([t["classify_s"] for t in kind_turns], items)
            turns += kind_turns
        result["sentiment"] = {"alone": alone, "interleaved": interleaved}
        result["reply"] = {"max_tokens": reply_tokens, **_reply_summary(turns)}
        result["load"].update({k + "_after_chat": v for k, v in memory_mb().items()})
        result["accuracy"] = {}
        for name, rows in job["datasets"].items():
            log.info("accuracy: %s", name)
            rows = rows[: job["limit"] or None]
            gold, data = [g for g, _ in rows], [t for _, t in rows]
            predicted, seconds = classify_dataset(lambda t: canonical_label(bot.classify(t).label), data, name)
            result["accuracy"][name] = {"gold": gold, "predicted": predicted, "seconds": seconds}
    return result


def main(job_path: str, result_path: str) -> int:
    logging.basicConfig(level=logging.INFO, format="  [worker] %(message)s", stream=sys.stderr)
    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    Path(result_path).write_text(json.dumps(run_job(job), ensure_ascii=False), encoding="utf-8")
    return 0
