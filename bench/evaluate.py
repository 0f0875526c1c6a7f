"""evaluate.py's throughput: items per second against a loopback server that answers every request in 50 ms,
at --concurrency 1 and 16 (goal: at least 12x).

    python bench/evaluate.py [--items 48] [--latency 0.05]

One server on 127.0.0.1, in a process of its own as a real endpoint would be, plays both the target and the
judge (the judge prefers the longer answer); the rewrites come from a file, so that only the requests are
timed: pairwise mode, 2 answers and 2 judgments per item, no cache. The first run also pays for importing
the openai client (about 1.5 s), so a warm-up run comes first.
"""

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import evaluate

KEY = "sk-bench"


def serve(latency: float, port_out=None) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real endpoints do
        disable_nagle_algorithm = True  # else the body waits for the headers' delayed ACK: 40 ms a request

        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            text = body["messages"][-1]["content"]
            time.sleep(latency)
            if "[The Start of Answer A]" in text:
                a, b = (text.split(f"[The Start of Answer {x}]\n")[1].split(f"\n[The End of Answer {x}]")[0]
                        for x in "AB")
                reply = "[[A]]" if len(a) > len(b) else "[[B]]" if len(b) > len(a) else "[[C]]"
            else:
                reply = "answer " * (len(text) // 8 + 1)
            data = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    if port_out is not None:  # in the server's own process
        port_out.put(server.server_address[1])
        server.serve_forever()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=48)
    p.add_argument("--latency", type=float, default=0.05, help="seconds the server takes per request")
    args = p.parse_args()
    ports = multiprocessing.Queue()
    server = multiprocessing.Process(target=serve, args=(args.latency, ports), daemon=True)
    server.start()
    url = f"http://127.0.0.1:{ports.get(timeout=30)}/v1"
    os.environ["BENCH_KEY"] = KEY
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        instructions = [f"instruction number {i}: " + "explain " * (i % 5) for i in range(args.items)]
        (tmp / "i.json").write_text(json.dumps([{"instruction": t} for t in instructions]))
        (tmp / "r.jsonl").write_text("".join(json.dumps({"instruction": t, "rewrite": t + " in detail" * (i % 3)})
                                             + "\n" for i, t in enumerate(instructions)))
        rates = {}
        for concurrency in (16, 1, 16):  # the first is a warm-up
            cfg = evaluate.EvalConfig(instructions=str(tmp / "i.json"), rewrites=str(tmp / "r.jsonl"),
                                      out=str(tmp / "out"), target_url=url, target_model="t",
                                      target_key_env="BENCH_KEY", judge_url=url, judge_model="j",
                                      judge_key_env="BENCH_KEY", concurrency=concurrency, cache="", bootstrap=200)
            start = time.perf_counter()
            results = evaluate.main(cfg)
            seconds = time.perf_counter() - start
            sent = sum(results["requests_sent"].values())
            rates[concurrency] = args.items / seconds
            print(f"concurrency {concurrency:2}: {args.items} items, {sent} requests in {seconds:.2f} s: "
                  f"{rates[concurrency]:.1f} items/s", file=sys.stderr)
    print(f"concurrency 16 / concurrency 1: {rates[16] / rates[1]:.1f}x (goal: at least 12x)")
    server.terminate()


if __name__ == "__main__":
    main()
