"""serve.py's dynamic batching: aggregate tokens/s with 1, 4 and 16 concurrent clients, and time to first
token, on the tiny preset and on a 2-layer full-width Phi-2 (goal: 16 clients at least 4x the throughput of
one at a time, each reply equal to what its request gets alone).

    python bench/serve.py [--requests 32] [--max-tokens 32] [--configs tiny,phi-2-2layer] [--precisions fp32,bf16]

Random-weight models (and a random head) written to a temporary folder; the server runs as `python
serve.py` in a process of its own on 127.0.0.1; clients are threads using the openai client, each sending
its share of the same greedy, streamed requests (half to `base`, half to the head) one after another. The
full-width model uses the real Phi-2 tokenizer from ../shared when it is there, else it is skipped.
"""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch

import head_adapter as ha
import phi2
from phi2.weights import fingerprint

SHARED_TOKENIZER = ROOT.parent / "shared" / "data" / "phi-2"
TOPICS = ["rain", "taxes", "sorting", "café life", "rivers", "compilers", "tea", "chess"]
PROMPTS = [f"{verb} about {topic}" for verb in ("write a poem", "explain", "summarize a report", "plan a trip")
           for topic in TOPICS]


def make_model(name: str, folder: Path) -> bool:
    """A random base and head in folder; False if the config needs a tokenizer that is absent."""
    if name == "tiny":
        config = phi2.Phi2Config.from_name("tiny")
        tokenizer = phi2.train_tokenizer(PROMPTS * 4 + ["System: Fix the following prompt. Prompt: . Answer:"],
                                         config.vocab_size)
    else:
        if not (SHARED_TOKENIZER / "tokenizer.json").exists():
            return False
        config = phi2.Phi2Config.from_name("phi-2", n_layer=2)
        tokenizer = phi2.load_tokenizer(SHARED_TOKENIZER)
    model = phi2.build_model(config)
    phi2.save_hf_checkpoint(model, folder)
    tokenizer.save(folder)
    head = ha.HeadAdapter(model.lm_head)
    with torch.no_grad():
        head.adapter.weight.add_(0.02 * torch.randn_like(head.adapter.weight))
    ha.save_head(head, folder / "t.safetensors", "t", model, fingerprint(model), "none")
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_clients(client, requests, concurrency, max_tokens):
    """Each request once, by `concurrency` threads; ({request index: (text, ttft, tokens)}, seconds)."""
    results, todo, lock = {}, list(enumerate(requests)), threading.Lock()

    def work():
        while True:
            with lock:
                if not todo:
                    return
                index, (prompt, model) = todo.pop()
            start, first, text, tokens = time.perf_counter(), None, "", 0
            for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                        temperature=0, max_tokens=max_tokens, stream=True,
                                                        stream_options={"include_usage": True}):
                if chunk.usage:
                    tokens = chunk.usage.completion_tokens
                for choice in chunk.choices:
                    if choice.delta.content or choice.finish_reason:  # a reply may be empty
                        first = first or time.perf_counter() - start
                    text += choice.delta.content or ""
            results[index] = (text, first, tokens)

    start = time.perf_counter()
    threads = [threading.Thread(target=work) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - start


def bench(name, precision, args):
    import openai

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if not make_model(name, folder):
            print(f"{name}: skipped (the Phi-2 tokenizer is not in {SHARED_TOKENIZER})")
            return None
        name = f"{name} {precision}"
        port = free_port()
        log = open(folder / "server.log", "w")
        server = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--model", str(folder), "--head",
                                   str(folder / "t.safetensors"), "--port", str(port), "--max-batch", "16",
                                   "--max-queue", "256", "--device", args.device, "--precision", precision],
                                  cwd=ROOT, stderr=log)
        try:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
            for _ in range(600):  # up to a minute to load
                try:
                    client.models.list()
                    break
                except openai.APIConnectionError:
                    if server.poll() is not None:
                        sys.exit(f"{name}: the server stopped:\n{(folder / 'server.log').read_text()[-2000:]}")
                    time.sleep(0.1)
            requests = [(PROMPTS[i % len(PROMPTS)], "base" if i % 2 else "t") for i in range(args.requests)]
            run_clients(client, requests[:4], 1, args.max_tokens)  # warm-up
            rows, solo = {}, None
            for concurrency in (1, 4, 16):
                results, seconds = run_clients(client, requests, concurrency, args.max_tokens)
                tokens = sum(r[2] for r in results.values())
                solo = solo or results
                same = sum(results[k][0] == solo[k][0] for k in results)
                rows[concurrency] = tokens / seconds
                print(f"{name}: {concurrency:2} clients: {tokens} tokens in {seconds:.2f} s = {tokens / seconds:7.1f} "
                      "tok/s; time to first token median "
                      f"{1000 * statistics.median(r[1] for r in results.values()):.0f}"
                      f" ms; {same}/{len(results)} replies equal to the one-at-a-time run", flush=True)
            print(f"{name}: 16 clients / 1 client: {rows[16] / rows[1]:.1f}x (goal: at least 4x)", flush=True)
            return rows
        finally:
            server.terminate()
            server.wait(timeout=30)
            log.close()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--configs", default="tiny,phi-2-2layer")
    p.add_argument("--device", default="auto")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated; each gets a server of its own")
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in args.configs.split(","):
        for precision in args.precisions.split(","):
            bench(name, precision, args)


if __name__ == "__main__":
    main()
