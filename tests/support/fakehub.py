"""A tiny stand-in for the Hugging Face hub on localhost: enough of `/{repo}/resolve/{rev}/{file}`
for `huggingface_hub.hf_hub_download`, with the error codes the real hub sends. It records every
path asked for, so a test can prove which files were fetched (configs, never weights)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """`repos`: repo id -> {filename: bytes}; `gated`: repo ids that answer 403 GatedRepo."""

    def __init__(self, repos: dict[str, dict[str, bytes]], gated: tuple[str, ...] = ()):
        self.repos, self.gated, self.requests = repos, gated, []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):
                self._answer(body=False)

            def do_GET(self):
                self._answer(body=True)

            def log_message(self, *args):  # quiet
                pass

            def _answer(self, body: bool):
                hub.requests.append(self.path)
                status, headers, content = hub.route(self.path)
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                if body:
                    self.wfile.write(content)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def route(self, path: str):
        parts = path.split("?")[0].strip("/").split("/")
        if "resolve" not in parts:
            return 404, {"X-Error-Code": "RepoNotFound"}, b"{}"
        at = parts.index("resolve")
        repo, filename = "/".join(parts[:at]), "/".join(parts[at + 2:])
        if repo in self.gated:
            return 403, {"X-Error-Code": "GatedRepo", "X-Error-Message": "gated"}, b"{}"
        if repo not in self.repos:
            return 404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, b"{}"
        files = self.repos[repo]
        if filename not in files:
            return 404, {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"}, b"{}"
        content = files[filename]
        return 200, {"X-Repo-Commit": COMMIT, "ETag": f'"{abs(hash(content))}"',
                     "Content-Type": "application/octet-stream"}, content

    def __enter__(self) -> FakeHub:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def config_bytes(**values) -> bytes:
    return json.dumps({"model_type": "llama", **values}).encode()
