"""The loopback HTTP servers the tests stand up as LLM endpoints: one ThreadingHTTPServer on 127.0.0.1, on a
free port, in a daemon thread, whose POST handler is a function the test gives."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LoopbackServer:
    """respond(handler, body) answers each POST; body is the request's bytes. url: http://127.0.0.1:PORT."""

    def __init__(self, respond):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                respond(self, self.rfile.read(int(self.headers.get("Content-Length", 0))))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def send_json(handler, status, payload, headers=None, raw: bytes | None = None):
    """Answer with payload as JSON (or raw bytes as they are), the status and any extra headers."""
    data = raw if raw is not None else json.dumps(payload).encode()
    handler.send_response(status)
    for k, v in (headers or {}).items():
        handler.send_header(k, v)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def completion(text: str) -> dict:
    """A chat completion whose one choice says text."""
    return {"choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}]}
