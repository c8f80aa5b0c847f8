"""The OpenAI-compatible HTTP API (`/v1/...`), served by app.py on the same port as the page.

    curl http://127.0.0.1:7860/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "any", "messages": [{"role": "user", "content": "今天的实验终于成功了！"}], "stream": true}'

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:7860/v1", api_key="unused")
    r = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "我好累"}])
    r.choices[0].message.content, r.model_extra["sentiment"]

Endpoints: GET /v1/models; POST /v1/chat/completions (stream as server-sent events, messages, max_tokens,
temperature, top_p, seed, stop, usage; response_format json_object / json_schema, a grammar the reply is sampled
under; logprobs / top_logprobs; a request with `tools` is refused with a 400, the model never calls a tool; the
sentiment of the last user message as an extension object "sentiment": {"label", "confidence", "probs"} on the
response and on the first stream chunk); POST /v1/classify (one text or a list of at most max_classify_texts;
"order": "triage" returns the items most urgent first, each keeping its input `index`; with `app.py --rules FILE`
each item carries "severity" and its "rules" matches, faces/rules.py); GET /health (503 while the model loads). Errors use OpenAI's shape {"error": {"message", "type", "param",
"code"}}. System messages are accepted and ignored: the assistant's own system prompt makes the reply empathetic.
The model field is echoed; the loaded model answers. The API key and the body bound: http_guard.py. The wellbeing
watch (faces/care.py) reads a chat request's recent user messages: the reply and the first stream chunk carry
"wellbeing": {"negative_share", "alert"}, and while the alert holds the reply checks in gently; a request's
"wellbeing": false (or app.py --no-wellbeing) turns it off.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..wellbeing import AlertRule
from .care import check_in, labelled, trend_json
from .defaults import AppSettings
from .rules import RuleSet, highest, match_json, triage_key

log = logging.getLogger(__name__)

RETRY_AFTER_S = 2           # what a client is told to wait when the queue is full or the model loads
CLASSIFY_ORDERS = ("input", "triage")   # /v1/classify "order": the input's, or the most urgent first


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.type, self.param, self.code, self.headers = status, type_, param, code, headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": str(self), "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=self.headers)


def _busy(message: str) -> ApiError:
    return ApiError(503, message, "server_error", code="server_busy", headers={"Retry-After": str(RETRY_AFTER_S)})


def content_text(content: Any, i: int) -> str:
    """A message's text: a string, or OpenAI's list of parts whose text parts are joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if any(p.get("type") != "text" for p in content):
            raise ApiError(400, f"messages[{i}].content: only text parts are supported", param=f"messages[{i}]")
        return "".join(str(p.get("text", "")) for p in content)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", param=f"messages[{i}]")


def parse_messages(messages: Any) -> tuple[str, list[dict]]:
    """(the last user message, the history before it) from an OpenAI `messages` list."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"messages[{i}].role {role!r} is not supported (system, user, assistant)",
                           param=f"messages[{i}].role")
        text = content_text(m.get("content"), i)
        if role in ("user", "assistant"):
            turns.append({"role": role, "content": text})
    if not turns or turns[-1]["role"] != "user":
        raise ApiError(400, "the last message must come from the user", param="messages")
    if not turns[-1]["content"].strip():
        raise ApiError(400, "the last user message is empty", param="messages")
    return turns[-1]["content"], turns[:-1]


def _number(body: dict, name: str, kind: type, low: float | None = None, high: float | None = None):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and int(value) != value):
        raise ApiError(400, f"{name} must be {'an integer' if kind is int else 'a number'}", param=name)
    value = kind(value)
    if (low is not None and value < low) or (high is not None and value > high):
        bound = (f"between {low} and {high}" if low is not None and high is not None
                 else f">= {low}" if low is not None else f"<= {high}")
        raise ApiError(400, f"{name} must be {bound}, not {value}", param=name)
    return value


def refuse_tools(body: dict) -> None:
    """This server's replies are text: a request that offers tools is refused, never answered as if they were not
    there (an agent could not tell that no call will ever come). tool_choice "none" says not to call any."""
    for name in ("tools", "functions"):
        if body.get(name) and body.get("tool_choice" if name == "tools" else "function_call") != "none":
            raise ApiError(400, f"{name} are not supported: this server's model answers in text only and never "
                           f"calls a tool; leave out `{name}` (or set tool_choice to \"none\")", param=name,
                           code="unsupported_parameter")


def reply_format(body: dict) -> str | None:
    """The grammar for `response_format`: None for text, any JSON object for json_object, the schema's grammar for
    json_schema (OpenAI's {"type": "json_schema", "json_schema": {"name", "schema", "strict"}})."""
    from ..runtime import json_grammar
    fmt = body.get("response_format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return json_grammar(None)
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise ApiError(400, "response_format.json_schema must be an object with a `schema` object",
                           param="response_format")
        try:
            return json_grammar(spec.get("schema") or None)
        except ValueError as e:
            raise ApiError(400, f"response_format.json_schema: {e}", param="response_format") from None
    raise ApiError(400, "response_format.type must be text, json_object or json_schema", param="response_format")


def logprobs_option(body: dict) -> int | None:
    """How many alternatives per token (`top_logprobs`) when `logprobs` is true; None when logprobs are off."""
    from ..runtime import MAX_TOP_LOGPROBS
    top = _number(body, "top_logprobs", int, 0, MAX_TOP_LOGPROBS)
    if not body.get("logprobs"):
        if top:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return None
    return top or 0


def logprobs_json(entries) -> dict:
    """OpenAI's choice.logprobs: {"content": [{"token", "logprob", "bytes", "top_logprobs"}]}."""
    def one(token: bytes, logprob: float) -> dict:
        return {"token": token.decode("utf-8", "replace"), "logprob": round(logprob, 6), "bytes": list(token)}
    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                        for e in entries], "refusal": None}


def user_messages(messages: list) -> list[tuple[int, str]]:
    """(index in `messages`, text) of each user message with text, oldest first (parse_messages checked them)."""
    found = [(i, content_text(m.get("content"), i)) for i, m in enumerate(messages) if m.get("role") == "user"]
    return [(i, text) for i, text in found if text.strip()]


def wellbeing_option(body: dict, enabled: bool) -> bool:
    """Whether this request runs the wellbeing watch: the request's "wellbeing" (true unless false), when the app's
    is on (app.py --no-wellbeing turns it off for every request)."""
    value = body.get("wellbeing")
    if value is not None and not isinstance(value, bool):
        raise ApiError(400, "wellbeing must be true or false", param="wellbeing")
    return enabled and value is not False


def sentiment_json(s) -> dict:
    return {"label": s.label, "confidence": round(float(s.confidence), 6),
            "probs": {k: round(float(v), 6) for k, v in s.probs.items()}, "source": s.source}


def build_router(get_bot: Callable[[], Any], model_name: Callable[[], str],
                 is_ready: Callable[[], bool] = lambda: True,
                 max_classify_texts: int = AppSettings.max_classify_texts,
                 rules: RuleSet | None = None, wellbeing: bool = AppSettings.wellbeing,
                 wellbeing_lookback: int = AppSettings.wellbeing_lookback) -> APIRouter:
    """The /v1 routes and /health. `get_bot()` returns the loaded AllInOne (or raises while it loads); `rules`
    (app.py --rules) are matched on every text /v1/classify labels. The API key and the body size bound are checked
    in front of every route (http_guard.Guard). With `wellbeing` a chat request's last `wellbeing_lookback` user
    messages are read by the wellbeing watch (faces/care.py): its reply carries the `wellbeing` object, and checks
    in gently while the alert holds."""
    router = APIRouter()
    rule = AlertRule()      # the watch's rule, its defaults from allinone_gguf/wellbeing.py (API messages: no times)

    async def body_of(request: Request) -> dict:
        try:
            body = json.loads(await request.body() or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def bot_or_503():
        if not is_ready():
            raise _busy("the model is still loading")
        return get_bot()

    def guarded(handler):
        async def endpoint(request: Request):
            try:
                return await handler(request)
            except ApiError as e:
                return e.response()
            except Exception as e:      # the runtime's own errors, by kind
                return _runtime_error(e).response()
        endpoint.__name__ = handler.__name__
        return endpoint

    @router.get("/health")
    async def health():
        if not is_ready():
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
        return {"status": "ok", "model": model_name(), **get_bot().load}

    async def models(request: Request):
        return {"object": "list", "data": [{"id": model_name(), "object": "model", "created": 0,
                                            "owned_by": "allinone-gguf"}]}

    async def classify(request: Request):
        body = await body_of(request)
        texts = body.get("input")
        single = isinstance(texts, str)
        texts = [texts] if single else texts
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise ApiError(400, "input must be a string or a non-empty list of strings", param="input")
        if len(texts) > max_classify_texts:
            raise ApiError(400, f"input holds {len(texts)} texts, more than the {max_classify_texts} one request may "
                           "carry (max_classify_texts); send them in several requests", param="input",
                           code="too_many_inputs")
        order = "input" if body.get("order") is None else body["order"]
        if order not in CLASSIFY_ORDERS:
            raise ApiError(400, f"order must be one of {', '.join(map(repr, CLASSIFY_ORDERS))}, not {order!r}",
                           param="order")
        labels = body.get("labels")
        bot = bot_or_503()
        results = await asyncio.to_thread(bot.classify_many, texts, labels)
        data = [{"index": i, **sentiment_json(s)} for i, s in enumerate(results)]
        if rules is not None:      # beside the label, never instead of it
            found = await asyncio.to_thread(lambda: [rules.match(t) for t in texts])
            for item, matches in zip(data, found):
                item.update(severity=highest(matches), rules=[match_json(m) for m in matches])
        if order == "triage":
            p_negative = [s.probs[s.labels[1]] for s in results]      # the runtime's own P(negative)
            data.sort(key=lambda item: triage_key(item.get("severity"), p_negative[item["index"]]))
        return {"object": "list", "model": model_name(), "data": data}

    async def chat_completions(request: Request):
        body = await body_of(request)
        text, history = parse_messages(body.get("messages"))
        if body.get("n") not in (None, 1):
            raise ApiError(400, "only n=1 is supported", param="n")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(x, str) for x in stop) or len(stop) > 4:
            raise ApiError(400, "stop must be a string or a list of up to 4 strings", param="stop")
        refuse_tools(body)
        max_tokens = _number(body, "max_completion_tokens", int, 1) or _number(body, "max_tokens", int, 1)
        options = dict(temperature=_number(body, "temperature", float, 0, 2), max_tokens=max_tokens,
                       seed=_number(body, "seed", int), top_p=_number(body, "top_p", float, 0, 1), stop=stop,
                       conversation=body.get("user") if isinstance(body.get("user"), str) else None,
                       shorten=False, grammar=reply_format(body), logprobs=logprobs_option(body))
        if options["top_p"] == 0:
            options["top_p"] = 1e-6
        watch = wellbeing_option(body, wellbeing)
        bot = bot_or_503()
        care, earlier, last = False, [], None
        if watch:   # the request is the conversation: its recent earlier user messages are labelled in one batch
            recent = user_messages(body["messages"])[-wellbeing_lookback:]
            last, texts = recent[-1][0], [t for _, t in recent[:-1]]
            found = await asyncio.to_thread(bot.classify_many, texts) if texts else []
            earlier = [labelled(i, s) for (i, _), s in zip(recent[:-1], found)]
            care = check_in(earlier, last, rule)
        stream = bot.respond(text, history=history, care=care, **options)   # the label and the prefill overlap
        try:
            await asyncio.to_thread(stream.wait_started)        # refusals (context, queue) before any byte is sent
            sentiment = await asyncio.to_thread(stream.sentiment)
        except BaseException:
            stream.close()
            raise
        rid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), body.get("model") or model_name()
        extra = {"sentiment": sentiment_json(sentiment)}
        if watch:
            extra["wellbeing"] = trend_json([*earlier, labelled(last, sentiment)], rule)
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(_sse(request, stream, rid, created, model, extra, include_usage,
                                          options["logprobs"] is not None),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        pieces = []
        try:
            while True:
                piece = await _next_or_disconnect(request, stream)
                if piece is None:
                    break
                pieces.append(piece)
        finally:
            stream.close()
        return {"id": rid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                             "logprobs": logprobs_json(stream.logprobs()) if options["logprobs"] is not None
                             else None, "finish_reason": _finish(stream)}],
                "usage": _usage(stream), **extra}

    router.add_api_route("/v1/models", guarded(models), methods=["GET"])
    router.add_api_route("/v1/classify", guarded(classify), methods=["POST"])
    router.add_api_route("/v1/chat/completions", guarded(chat_completions), methods=["POST"])
    return router


def _runtime_error(e: Exception) -> ApiError:
    from ..runtime import ContextOverflow, QueueFull
    if isinstance(e, ContextOverflow):
        return ApiError(400, str(e), param="messages", code="context_length_exceeded")
    if isinstance(e, QueueFull):
        return _busy(str(e))
    if isinstance(e, (ValueError, TypeError)):
        return ApiError(400, str(e))
    log.exception("request failed")
    return ApiError(500, f"internal error: {e}", "server_error")


def _finish(stream) -> str:
    return "length" if stream.finish_reason == "length" else "stop"


def _usage(stream) -> dict:
    u = stream.usage
    return {"prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"],
            "total_tokens": u["prompt_tokens"] + u["completion_tokens"],
            "prompt_tokens_details": {"cached_tokens": u["cached_tokens"]}}


_DONE = object()


async def _next_or_disconnect(request: Request, stream) -> str | None:
    """The stream's next piece (None at its end); cancels the reply when the client has gone away."""
    task = asyncio.ensure_future(asyncio.to_thread(next, stream, _DONE))
    gone = False
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if done:
            piece = task.result()
            return None if piece is _DONE or gone else piece
        if not gone and await request.is_disconnected():
            stream.cancel()      # the worker frees the slot at its next step; next() then ends
            gone = True
            log.info("client went away: reply cancelled")


async def _sse(request: Request, stream, rid: str, created: int, model: str, extra: dict, include_usage: bool,
               with_logprobs: bool = False):
    """The stream's events; the first carries `extra` (the "sentiment" object, and "wellbeing" when watched)."""
    sent = 0      # token log probabilities already sent

    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        nonlocal sent
        logprobs = None
        if with_logprobs and "content" in delta:
            entries = stream.logprobs(sent)
            sent += len(entries)
            logprobs = logprobs_json(entries)
        data = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
    try:
        yield chunk({"role": "assistant", "content": ""}, **extra)
        while True:
            piece = await _next_or_disconnect(request, stream)
            if piece is None:
                break
            yield chunk({"content": piece})
        yield chunk({}, _finish(stream))
        if include_usage:
            data = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [], "usage": _usage(stream)}
            yield f"data: {json.dumps(data)}\n\n"
        yield "data: [DONE]\n\n"
    finally:        # also when Starlette stops this generator because the client disconnected
        if stream.finish_reason is None:
            log.info("client went away: reply cancelled")
        stream.close()
