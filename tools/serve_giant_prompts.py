"""Giant prompts against `specllava serve` on the default pair: an 8 MB prompt (over the character
bound: refused before tokenization) and prompts just under the bound (tokenized, then over the
context), each while a small request is answered; prints the refusal, how long each took and the
process's resident memory against its level before them.

    python tools/serve_giant_prompts.py [--repeat 3]

Latencies depend on what else the machine runs; the memory is what the test
`tests/serve/test_serve_surface.py::test_memory_returns_after_giant_requests` bounds.
"""

import argparse
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import psutil
import uvicorn

from specllava.cli import build_parser
from specllava.serve.cli import build


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="prompts at the character bound to send (default: 3)")
    opts = ap.parse_args()
    app, engine = build(build_parser().parse_args(["serve", "--max-tokens", "8"]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"

    def post(text: str):
        body = json.dumps({"messages": [{"role": "user", "content": text}], "max_tokens": 8}).encode()
        req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        t = time.monotonic()
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                status, out = r.status, json.loads(r.read())
        except urllib.error.HTTPError as err:
            status, out = err.code, json.loads(err.read())
        return status, out, time.monotonic() - t

    proc = psutil.Process()
    post("Hi")
    rss0 = proc.memory_info().rss
    print(f"character bound: {engine.max_prompt_chars} (context {engine.context} tokens)")
    cases = [("8 MB prompt", "word " * 1_600_000)] + [("prompt at the bound", "z " * (engine.max_prompt_chars // 2))] * opts.repeat
    try:
        for name, text in cases:
            big = {}
            thread = threading.Thread(target=lambda: big.update(r=post(text)))
            thread.start()
            time.sleep(0.05)
            small = post("Name three colours.")
            thread.join()
            status, out, took = big["r"]
            print(f"{name}: {status} {out['error']['code']} in {took:.2f} s; a small request meanwhile: {small[0]} in "
                  f"{small[2]:.2f} s; resident memory {(proc.memory_info().rss - rss0) / 2**20:+.0f} MiB")
    finally:
        server.should_exit = True
        engine.close()


if __name__ == "__main__":
    main()
