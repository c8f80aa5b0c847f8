"""Pure helpers of the Gradio app: badge text, chat -> history, mood chart, model menu, loopback check."""
import re

import pytest

from allinone_gguf.faces.ui_helpers import (
    BADGE_RE,
    assistant_text,
    badge,
    content_text,
    history_from_chat,
    is_loopback,
    list_models,
    mood_point,
    mood_svg,
)


@pytest.mark.parametrize("label, confidence, negative, lang, expected", [
    ("正面", 0.93, False, "zh", "😄 LLM 情感判断: 正面 (置信度 93%)"),
    ("负面", 0.5, True, "zh", "😢 LLM 情感判断: 负面 (置信度 50%)"),
    ("Positive", 1.0, False, "en", "😄 LLM sentiment: Positive (confidence 100%)"),
    ("Negative", 0.666, True, "en", "😢 LLM sentiment: Negative (confidence 67%)"),
])
def test_badge_has_the_seeds_form_and_the_confidence(label, confidence, negative, lang, expected):
    assert badge(label, confidence, negative, lang) == expected
    assert BADGE_RE.match(expected)


@pytest.mark.parametrize("content, expected", [
    ("plain", "plain"),
    ([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "ab"),  # Gradio 6 normalised content
    ({"type": "text", "text": "x"}, "x"),
    ([{"type": "file", "file": {"path": "/tmp/x.png"}}], ""),
    (None, ""),
])
def test_content_text(content, expected):
    assert content_text(content) == expected


def test_history_drops_badges_empty_turns_and_other_roles():
    zh = badge("负面", 0.8, True)
    en = badge("Positive", 0.9, False, "en")
    chat = [
        {"role": "system", "content": "ignored"},
        {"role": "user", "content": [{"type": "text", "text": "考试没过"}]},
        {"role": "assistant", "content": [{"type": "text", "text": assistant_text(zh, "别灰心。\n\n下次加油")}]},
        {"role": "user", "content": "好吧"},
        {"role": "assistant", "content": zh},  # stopped before the first piece
        {"role": "user", "content": "great"},
        {"role": "assistant", "content": assistant_text(en, "Nice!")},
    ]
    assert history_from_chat(chat) == [
        {"role": "user", "content": "考试没过"},
        {"role": "assistant", "content": "别灰心。\n\n下次加油"},
        {"role": "user", "content": "好吧"},
        {"role": "user", "content": "great"},
        {"role": "assistant", "content": "Nice!"},
    ]
    assert history_from_chat(None) == []


def test_history_keeps_a_reply_that_merely_mentions_a_badge_later():
    text = "I said: 😄 LLM sentiment: Positive"
    assert history_from_chat([{"role": "assistant", "content": text}]) == [{"role": "assistant", "content": text}]


@pytest.mark.parametrize("probs, positive, mood", [
    ({"正面": 0.9, "负面": 0.1}, "正面", 0.8),
    ({"正面": 0.25, "负面": 0.75}, "正面", -0.5),
    ({"Positive": 0.5, "Negative": 0.5}, "Positive", 0.0),
])
def test_mood_point_is_p_positive_minus_p_negative(probs, positive, mood):
    point = mood_point(3, max(probs, key=probs.get), probs, positive)
    assert point["turn"] == 3 and point["mood"] == pytest.approx(mood)


def test_mood_svg_draws_one_coloured_bar_per_turn():
    points = [mood_point(i + 1, lab, {"正面": p, "负面": 1 - p}, "正面")
              for i, (lab, p) in enumerate([("正面", 0.9), ("负面", 0.2), ("正面", 0.6)])]
    svg = mood_svg(points)
    bars = re.findall(r'<rect class="mood-bar" data-turn="(\d+)" data-label="([^"]+)"[^>]* fill="(#\w+)"', svg)
    assert [(t, lab) for t, lab, _ in bars] == [("1", "正面"), ("2", "负面"), ("3", "正面")]
    assert bars[0][2] == bars[2][2] != bars[1][2]  # positive and negative bars differ in colour
    assert "http" not in svg.replace('xmlns="http://www.w3.org/2000/svg"', "")  # nothing to fetch
    assert "no turns yet" in mood_svg([]) and "mood-bar" not in mood_svg([])
    assert svg.count("mood-bar") == 3 and mood_svg(points * 20, last=24).count('class="mood-bar"') == 24


def test_mood_svg_escapes_labels():
    svg = mood_svg([{"turn": 1, "mood": 0.5, "label": "<b>&"}])
    assert "<b>" not in svg and "&lt;b&gt;&amp;" in svg


def test_list_models_offers_only_gguf_under_the_folder(tmp_path):
    (tmp_path / "models" / "a").mkdir(parents=True)
    for name in ("a/x-Q8_0.gguf", "a/x-Q4_K_M.gguf", "notes.txt", "a/x.gguf.tmp"):
        (tmp_path / "models" / name).write_bytes(b"")
    outside = tmp_path / "elsewhere.gguf"
    outside.write_bytes(b"")
    names = [name for name, _ in list_models(tmp_path / "models")]
    assert names == ["a/x-Q4_K_M.gguf", "a/x-Q8_0.gguf"]
    with_extra = list_models(tmp_path / "models", extra=[outside, tmp_path / "missing.gguf"])
    assert [name for name, _ in with_extra] == names + ["elsewhere.gguf"]
    assert all(value.startswith("/") for _, value in with_extra)
    assert list_models(tmp_path / "nope") == []


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("localhost", True),
    ("0.0.0.0", False), ("192.168.1.5", False), ("::", False), ("example.org", False),
])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_the_makefile_reads_the_defaults_with_the_standard_library_alone():
    # `make` runs `python3 -m allinone_gguf.faces.defaults` before the virtual env exists
    import subprocess
    import sys
    code = ("import runpy, sys; runpy.run_module('allinone_gguf.faces.defaults', run_name='__main__'); "
            "print(sorted(m for m in ('numpy', 'gguf', 'llama_cpp', 'gradio') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    from allinone_gguf.faces.defaults import DEFAULT_MODEL, DEFAULT_PORT, model_file
    source, models, quant, host, port = out[0].split()
    assert model_file(source, quant, models) == DEFAULT_MODEL and int(port) == DEFAULT_PORT and out[1] == "[]"
