"""What stands in front of every route of the app (page, Gradio's API, /v1): the API key and the body size bound.

    guarded = Guard(fastapi_app, api_key="KEY", max_body_bytes=4 << 20)   # an ASGI app; uvicorn serves it

- **One key for every route.** With a key, a request reaches the app only with `Authorization: Bearer KEY`
  (API clients: openai, gradio_client's `headers=`, curl) or the session cookie the login form sets (browsers:
  `/login` asks for the key once; the cookie holds an HMAC of the key, never the key). Without either: `/v1/*`
  answers 401 in OpenAI's error shape, a browser asking for a page is sent to `/login`, everything else
  (Gradio's `/gradio_api/*`, `/config`, its queue and files, websockets) gets 401. Only `/health` and the login
  form itself stay open. `/logout` drops the cookie.
- **Bounded bodies.** A body larger than `max_body_bytes` is refused with 413 before the app parses a byte of
  it: at once from its Content-Length, or as soon as a chunked body passes the bound.

Like llama-server's `--api-key` (it guards every endpoint but /health) and Gradio's own `auth=` (a login page and
a cookie), but one check for the page, Gradio's routes and the OpenAI routes alike.
"""
from __future__ import annotations

import hashlib
import hmac
import html
import json
import secrets
from http.cookies import SimpleCookie
from urllib.parse import parse_qs, quote

COOKIE = "allinone_session"
OPEN_PATHS = frozenset({"/health"})
LOGIN, LOGOUT = "/login", "/logout"
LOGIN_FORM_BYTES = 16 * 1024        # the login form's own body bound


def session_value(api_key: str) -> str:
    """The cookie's value for `api_key`: an HMAC, so the cookie never holds the key itself."""
    return hmac.new(api_key.encode(), b"allinone-gguf session", hashlib.sha256).hexdigest()


def _header(scope, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return ""


async def _send_response(send, status: int, body: bytes, content_type: str, headers: list | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode()),
                            (b"cache-control", b"no-store"), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


async def send_json_error(send, status: int, message: str, type_: str, code: str, headers: list | None = None):
    """An error in OpenAI's shape {"error": {"message", "type", "param", "code"}} (every client reads it)."""
    body = json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()
    await _send_response(send, status, body, "application/json", headers)


def login_page(error: str = "", next_path: str = "/") -> bytes:
    note = f'<p class="error">{html.escape(error)}</p>' if error else ""
    return f"""<!doctype html>
<html lang="zh"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Qwen All-in-One (GGUF) — login</title>
<style>body{{font-family:system-ui,sans-serif;max-width:24rem;margin:15vh auto;padding:0 1rem}}
input{{width:100%;padding:.5rem;margin:.5rem 0;box-sizing:border-box}}button{{padding:.5rem 1rem}}
.error{{color:#b00020}}</style></head>
<body><h2>Qwen All-in-One (GGUF)</h2><p>This app needs its API key. / 请输入 API 密钥。</p>{note}
<form method="post" action="{LOGIN}"><input type="hidden" name="next" value="{html.escape(next_path)}">
<input type="password" name="key" id="key" autocomplete="current-password" autofocus placeholder="API key">
<button type="submit" id="login">Log in / 登录</button></form></body></html>""".encode()


def _safe_next(path: str) -> str:
    """Only a path on this server (no scheme, no //host) may be where the login sends the browser."""
    return path if path.startswith("/") and not path.startswith("//") and "\\" not in path else "/"


class Guard:
    """ASGI middleware: the key check and the body bound for everything `app` serves."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int):
        if api_key is not None and not api_key:
            raise ValueError("the API key must not be empty")
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes
        self._session = session_value(api_key) if api_key else None

    def allowed(self, scope) -> bool:
        if self.api_key is None:
            return True
        given = _header(scope, b"authorization")
        if given and secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            return True
        cookie = SimpleCookie()
        try:
            cookie.load(_header(scope, b"cookie"))
        except Exception:       # a malformed Cookie header is no session
            return False
        morsel = cookie.get(COOKIE)
        return morsel is not None and secrets.compare_digest(morsel.value.encode(), self._session.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket":
            if not self.allowed(scope):
                await send({"type": "websocket.close", "code": 1008})
                return
            return await self.app(scope, receive, send)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if self.api_key is not None and path in (LOGIN, LOGOUT):
            return await self._login(scope, receive, send, path)
        if path not in OPEN_PATHS and not self.allowed(scope):
            return await self._refuse(scope, send, path)
        length = _header(scope, b"content-length")
        if length:
            if not length.isdigit() or int(length) > self.max_body_bytes:   # h11 holds the body to this length
                return await self._too_large(send)
            return await self.app(scope, receive, send)
        if _header(scope, b"transfer-encoding"):
            # A chunked body has no length up front: read it here, at most the bound, then hand it on whole.
            body, more = b"", True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > self.max_body_bytes:
                    return await self._too_large(send)
            replayed = False

            async def receive_body():
                nonlocal replayed
                if replayed:
                    return await receive()
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await self.app(scope, receive_body, send)
        return await self.app(scope, receive, send)

    async def _too_large(self, send) -> None:
        await send_json_error(send, 413, f"the request body is larger than {self.max_body_bytes} bytes "
                              "(max_body_bytes)", "invalid_request_error", "request_too_large",
                              [(b"connection", b"close")])

    async def _refuse(self, scope, send, path: str) -> None:
        wants_page = scope.get("method") == "GET" and "text/html" in _header(scope, b"accept")
        if wants_page and not path.startswith("/v1"):
            query = scope.get("query_string", b"").decode("latin-1")
            target = path + (f"?{query}" if query else "")
            await _send_response(send, 303, b"", "text/plain",
                                 [(b"location", f"{LOGIN}?next={quote(target, safe='')}".encode())])
            return
        await send_json_error(send, 401, "missing or wrong API key (send Authorization: Bearer KEY, or log in at "
                              f"{LOGIN})", "authentication_error", "invalid_api_key",
                              [(b"www-authenticate", b'Bearer realm="allinone-gguf"')])

    async def _login(self, scope, receive, send, path: str) -> None:
        if path == LOGOUT:
            await _send_response(send, 303, b"", "text/plain", [
                (b"location", LOGIN.encode()),
                (b"set-cookie", f"{COOKIE}=; Max-Age=0; Path=/; HttpOnly; SameSite=Strict".encode())])
            return
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if scope.get("method") != "POST":
            page = login_page(next_path=_safe_next(query.get("next", ["/"])[0]))
            await _send_response(send, 200, page, "text/html; charset=utf-8")
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if len(body) > LOGIN_FORM_BYTES:
                return await send_json_error(send, 413, "the login form is too large", "invalid_request_error",
                                             "request_too_large", [(b"connection", b"close")])
            if not message.get("more_body"):
                break
        form = parse_qs(body.decode("utf-8", "replace"))
        key, next_path = form.get("key", [""])[0], _safe_next(form.get("next", ["/"])[0])
        if not secrets.compare_digest(key.encode(), self.api_key.encode()):
            await _send_response(send, 401, login_page("Wrong key. / 密钥不对。", next_path),
                                 "text/html; charset=utf-8")
            return
        await _send_response(send, 303, b"", "text/plain", [
            (b"location", next_path.encode()),
            (b"set-cookie", f"{COOKIE}={self._session}; Path=/; HttpOnly; SameSite=Strict".encode())])
