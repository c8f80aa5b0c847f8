"""A minimal Hugging Face hub on 127.0.0.1, serving folders the way the hub does, for download tests.

    with FakeHub({"acme/tiny-qwen1.5": Path("checkout")}) as hub:
        os.environ["HF_ENDPOINT"] = hub.url      # then huggingface-hub talks to it

It answers the calls snapshot_download makes: the revision info (`/api/models/<repo>/revision/<rev>`,
with the commit sha), the file list (`/api/models/<repo>/tree/<sha>`) and `/<repo>/resolve/<rev>/<file>` (HEAD and GET, with ETag,
X-Repo-Commit and byte ranges for resumed downloads). Every request path is recorded in `requests`.
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class FakeHub:
    def __init__(self, repos: dict[str, Path]):
        self.repos = {rid: Path(p) for rid, p in repos.items()}
        self.commits = {rid: hashlib.sha1(rid.encode()).hexdigest() for rid in repos}
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _file(self):
                m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", self.path.split("?")[0])
                if not m or m.group(1) not in hub.repos:
                    return None, None
                rid, _, name = m.groups()
                path = hub.repos[rid] / name
                return rid, path if path.is_file() else None

            def _send_file_headers(self, rid, path, status=200, start=0, end=None):
                size = path.stat().st_size
                end = size - 1 if end is None else end
                etag = hashlib.sha256(f"{path.name}{size}".encode()).hexdigest()
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(end - start + 1))
                self.send_header("ETag", f'"{etag}"')
                self.send_header("X-Repo-Commit", hub.commits[rid])
                self.send_header("Accept-Ranges", "bytes")
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                self.end_headers()
                return start, end

            def _json(self, obj):
                body = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_HEAD(self):
                hub.requests.append(("HEAD", self.path))
                rid, path = self._file()
                if path is None:
                    self.send_error(404)
                    return
                self._send_file_headers(rid, path)

            def do_GET(self):
                hub.requests.append(("GET", self.path))
                m = re.match(r"^/api/models/([^/]+/[^/]+)/revision/([^/?]+)", self.path)
                if m:
                    rid = m.group(1)
                    if rid not in hub.repos:
                        self.send_response(404)
                        self.send_header("X-Error-Code", "RepoNotFound")
                        self.send_header("Content-Type", "application/json")
                        self.end_headers()
                        self.wfile.write(b'{"error": "Repository not found"}')
                        return
                    files = sorted(p.name for p in hub.repos[rid].iterdir() if p.is_file())
                    self._json({"id": rid, "modelId": rid, "sha": hub.commits[rid], "private": False,
                                "siblings": [{"rfilename": f} for f in files]})
                    return
                m = re.match(r"^/api/models/([^/]+/[^/]+)/tree/([^/?]+)", self.path)
                if m and m.group(1) in hub.repos:
                    files = sorted(p for p in hub.repos[m.group(1)].iterdir() if p.is_file())
                    self._json([{"type": "file", "path": p.name, "size": p.stat().st_size,
                                 "oid": hashlib.sha1(p.name.encode()).hexdigest()} for p in files])
                    return
                rid, path = self._file()
                if path is None:
                    self.send_error(404)
                    return
                rng = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                if rng:
                    start = int(rng.group(1))
                    end = int(rng.group(2)) if rng.group(2) else path.stat().st_size - 1
                    start, end = self._send_file_headers(rid, path, 206, start, end)
                else:
                    start, end = self._send_file_headers(rid, path)
                with open(path, "rb") as f:
                    f.seek(start)
                    left = end - start + 1
                    while left > 0:
                        block = f.read(min(left, 1 << 20))
                        self.wfile.write(block)
                        left -= len(block)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
