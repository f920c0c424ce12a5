"""A stand-in for the Hugging Face Hub's metadata API, for ``r2d check`` tests (no network here).

It answers what ``huggingface_hub.HfApi.model_info`` and ``dataset_info`` ask, as the Hub does:
``GET /api/models/<id>`` and ``GET /api/datasets/<id>`` with a JSON body, or a 404 carrying
``X-Error-Code: RepoNotFound`` for a repository that does not exist. Code reaches it through
``HF_ENDPOINT``, as it would reach a Hub mirror.
"""

from __future__ import annotations

import contextlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODELS = {"Qwen/Qwen2.5-7B-Instruct": False, "deepseek-ai/DeepSeek-R1-Distill-Llama-70B": False,
          "meta-llama/Llama-Guard-3-8B": "manual"}
"""Model id -> gated ("manual" as the Hub says, or False)."""
DATASETS = {"tatsu-lab/alpaca": ["instruction", "input", "output", "text"]}
"""Dataset id -> the columns its card lists."""


class _Hub(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = self.path.split("?")[0]
        for prefix, known in (("/api/models/", MODELS), ("/api/datasets/", DATASETS)):
            if path.startswith(prefix):
                repo = path[len(prefix):].split("/revision/")[0]
                if repo in known:
                    return self._json(200, self._info(prefix, repo, known[repo]))
                return self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        self._json(404, {"error": "not found"})

    @staticmethod
    def _info(prefix: str, repo: str, value) -> dict:
        info = {"id": repo, "_id": "0" * 24, "private": False, "sha": "0" * 40}
        if prefix == "/api/models/":
            return {**info, "modelId": repo, "gated": value}
        return {**info, "gated": False, "cardData": {"dataset_info": {"features": [{"name": c, "dtype": "string"}
                                                                                 for c in value]}}}

    def _json(self, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:  # quiet
        pass


@contextlib.contextmanager
def fake_hub():
    """A running stand-in Hub; yields its URL (for HF_ENDPOINT)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
