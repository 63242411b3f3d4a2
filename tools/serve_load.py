"""Load on `specllava serve`: N concurrent OpenAI-style chat requests on the shipped photos (the
bench's out-of-domain set), for each N, reporting the aggregate tokens/s and the p50/p95 latency per
request, with a plot and a JSON.

    python tools/serve_load.py --server "--threads 2"                        # starts `specllava serve --threads 2`
    python tools/serve_load.py --server "--max-batch 1" --server "--max-batch 8"   # two servers, interleaved
    python tools/serve_load.py --url http://127.0.0.1:8000 --api-key KEY     # a server already running

Each concurrency level sends the same `--requests` requests (photo i for request i, cycling through
the 8 photos), `--max-tokens` new tokens each at temperature 0, with N of them in flight at a time
(a closed loop: a client sends its next request when its last one is answered). Aggregate tokens/s:
the completion tokens of all of them over the wall time from the first sent to the last answered;
and per CPU second of the server process (its `process_cpu_seconds_total` before and after), which
depends less on what else the machine runs.
Latency: a request's own, sent to answered. Each request's latency is also compared with the same
request's at concurrency 1 ("x alone": the median over the repeats, then the max over requests), and
its answer with its answer at concurrency 1 (at temperature 0 a batch changes no answer, up to
near-ties of the target's logits in bf16).

With several `--server`/`--url`, every repeat runs every level on every server in turn (interleaved,
so a machine's changing load falls on all alike); the report is the median over `--repeat`.
Timings depend on what else the machine runs: the JSON records the load average before and after.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path


def photo_messages(limit: int | None = None) -> list[tuple[str, list[dict]]]:
    """(id, chat messages) for each shipped photo prompt, the image inline as a data: URL."""
    from specllava.bench.prompts import builtin_set

    out = []
    for p in builtin_set("out-of-domain", limit=limit):
        content = [{"type": "text", "text": p.prompt}]
        if p.image is not None:
            mime = "image/png" if p.image.suffix.lower() == ".png" else "image/jpeg"
            url = f"data:{mime};base64," + base64.b64encode(p.image.read_bytes()).decode()
            content.insert(0, {"type": "image_url", "image_url": {"url": url}})
        out.append((p.id, [{"role": "user", "content": content}]))
    return out


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear between the closest ranks (numpy's default)."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def run_level(url: str, api_key: str, prompts: list[tuple[str, list[dict]]], concurrency: int, requests: int,
              max_tokens: int, model: str | None = None, timeout_s: float = 600.0) -> dict:
    """Send `requests` chat requests (prompt i % len(prompts) for request i), `concurrency` in flight
    at a time; their latencies, tokens and answers, and the aggregate tokens/s."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=timeout_s)
    model = model or client.models.list().data[0].id

    def one(i: int) -> dict:
        pid, messages = prompts[i % len(prompts)]
        t = time.perf_counter()
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
        done = time.perf_counter()
        stats = (r.model_extra or {}).get("specllava", {})
        return {"request": i, "prompt": pid, "sent": t, "latency_s": done - t, "done": done,
                "completion_tokens": r.usage.completion_tokens, "text": r.choices[0].message.content,
                "time_to_first_token_s": stats.get("time_to_first_token_s"),
                "mean_accepted_length": stats.get("mean_accepted_length")}

    cpu = server_cpu_s(url)
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        rows = list(pool.map(one, range(requests)))
    cpu = server_cpu_s(url) - cpu if cpu is not None else None
    wall = max(r["done"] for r in rows) - min(r["sent"] for r in rows)
    tokens = sum(r["completion_tokens"] for r in rows)
    lat = [r["latency_s"] for r in rows]
    for r in rows:
        del r["sent"], r["done"]
    return {"concurrency": concurrency, "requests": rows, "wall_s": wall, "completion_tokens": tokens,
            "tokens_per_s": tokens / wall, "latency_p50_s": percentile(lat, 50), "latency_p95_s": percentile(lat, 95),
            "server_cpu_s": cpu, "tokens_per_cpu_s": tokens / cpu if cpu else None}


def server_cpu_s(url: str) -> float | None:
    """The server process's CPU seconds so far (`process_cpu_seconds_total` of its /metrics), None
    where it does not export them. Less sensitive than wall time to what else the machine runs."""
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
            text = r.read().decode()
    except (urllib.error.URLError, OSError):
        return None
    for line in text.splitlines():
        if line.startswith("process_cpu_seconds_total "):
            return float(line.split()[1])
    return None


def summarize(runs: list[dict]) -> dict:
    """Medians over the repeats of one server's runs of one level, each request's latency against
    the same request's at concurrency 1 (from `runs` of level 1, when there are), and answers that
    differ from it."""
    by_level: dict[int, list[dict]] = {}
    for run in runs:
        by_level.setdefault(run["concurrency"], []).append(run)

    def per_request(level_runs, key):
        out: dict[int, list] = {}
        for run in level_runs:
            for r in run["requests"]:
                out.setdefault(r["request"], []).append(r[key])
        return out

    alone_lat = {i: statistics.median(v) for i, v in per_request(by_level.get(1, []), "latency_s").items()}
    alone_text = {i: v[0] for i, v in per_request(by_level.get(1, []), "text").items()}
    levels = []
    for n in sorted(by_level):
        level_runs = by_level[n]
        row = {"concurrency": n, "repeats": len(level_runs),
               "tokens_per_s": statistics.median(r["tokens_per_s"] for r in level_runs),
               "tokens_per_s_each": [r["tokens_per_s"] for r in level_runs],
               "tokens_per_cpu_s": _median_or_none([r.get("tokens_per_cpu_s") for r in level_runs]),
               "latency_p50_s": statistics.median(r["latency_p50_s"] for r in level_runs),
               "latency_p95_s": statistics.median(r["latency_p95_s"] for r in level_runs)}
        if alone_lat:
            ratios = {i: statistics.median(v) / alone_lat[i] for i, v in per_request(level_runs, "latency_s").items()
                      if i in alone_lat}
            row["latency_x_alone_median"] = statistics.median(ratios.values())
            row["latency_x_alone_max"] = max(ratios.values())
            row["answers_differing_from_alone"] = sum(r["text"] != alone_text[r["request"]] for run in level_runs
                                                      for r in run["requests"] if r["request"] in alone_text)
        levels.append(row)
    one = next((lv for lv in levels if lv["concurrency"] == 1), None)
    if one is not None:
        for lv in levels:
            lv["tokens_per_s_x_alone"] = lv["tokens_per_s"] / one["tokens_per_s"]
            if lv["tokens_per_cpu_s"] and one["tokens_per_cpu_s"]:
                lv["tokens_per_cpu_s_x_alone"] = lv["tokens_per_cpu_s"] / one["tokens_per_cpu_s"]
    return {"levels": levels}


def _median_or_none(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# ----------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _health(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
            return json.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


@contextmanager
def started_server(args: str, log_path: Path, timeout_s: float = 900.0):
    """`specllava serve ARGS` on a free port of 127.0.0.1 (this Python's specllava); its URL once ready."""
    port = _free_port()
    cmd = [sys.executable, "-m", "specllava", "serve", "--host", "127.0.0.1", "--port", str(port), *shlex.split(args)]
    url = f"http://127.0.0.1:{port}"
    # the server runs the specllava this Python imports (a source tree on PYTHONPATH, or the installed one)
    src = str(Path(importlib.util.find_spec("specllava").submodule_search_locations[0]).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + timeout_s
            while (h := _health(url)) is None or h.get("status") != "ok":
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{shlex.join(cmd)} did not become ready; its output:\n"
                                       + log_path.read_text()[-3000:])
                time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for server in report["servers"]:
        levels = server["levels"]
        ns = [lv["concurrency"] for lv in levels]
        line = ax1.plot(ns, [lv["tokens_per_s"] for lv in levels], "o-", label=server["name"])[0]
        ax2.plot(ns, [lv["latency_p50_s"] for lv in levels], "o-", color=line.get_color(), label=f"{server['name']} p50")
        ax2.plot(ns, [lv["latency_p95_s"] for lv in levels], "s--", color=line.get_color(), label=f"{server['name']} p95")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(report["concurrency"], [str(n) for n in report["concurrency"]])
        ax.set_xlabel("concurrent requests")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_ylabel("aggregate tokens/s")
    ax1.set_ylim(bottom=0)
    ax2.set_ylabel("latency per request (s)")
    ax2.set_ylim(bottom=0)
    fig.suptitle(f"specllava serve: {report['requests']} requests of {report['max_tokens']} new tokens per level, "
                 "median over the repeats", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_summary(report: dict) -> None:
    print(f"\n{report['requests']} requests of {report['max_tokens']} new tokens per level, median over the repeats "
          f"done (load average before {report['load_average_before'][0]:.1f}, after "
          f"{report['load_average_after'][0]:.1f}, on {report['cpus']} CPUs):")
    for server in report["servers"]:
        print(f"{server['name']} (max_batch {(server['health'] or {}).get('max_batch')}):")
        for lv in server["levels"]:
            extra = ""
            if "latency_x_alone_max" in lv:
                extra = (f"; tokens/s x{lv['tokens_per_s_x_alone']:.2f} of 1 concurrent, latency x{lv['latency_x_alone_median']:.2f} "
                         f"of alone (median), x{lv['latency_x_alone_max']:.2f} (max); answers differing from alone: "
                         f"{lv['answers_differing_from_alone']}")
            if lv["tokens_per_cpu_s"] is not None:
                extra += f"; {lv['tokens_per_cpu_s']:.2f} tokens per server CPU second"
                if "tokens_per_cpu_s_x_alone" in lv:
                    extra += f" (x{lv['tokens_per_cpu_s_x_alone']:.2f} of 1 concurrent)"
            print(f"  {lv['concurrency']:>3} concurrent ({lv['repeats']} repeats): {lv['tokens_per_s']:7.1f} tokens/s, "
                  f"latency p50 {lv['latency_p50_s']:.2f} s, p95 {lv['latency_p95_s']:.2f} s{extra}")


def write_report(report: dict, out: Path) -> None:
    """serve_load.json and serve_load.png in `out`, the summaries from the runs so far."""
    for server in report["servers"]:
        server.update(summarize(server["runs"]))
    (out / "serve_load.json").write_text(json.dumps(report, indent=1))
    plot(report, out / "serve_load.png")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server", action="append", default=[], metavar="ARGS",
                    help="start `specllava serve ARGS` (quoted flags, e.g. \"--threads 2 --max-batch 8\"; \"\" for "
                         "no flags) on a free port; repeatable: the servers run side by side, measured in turn")
    ap.add_argument("--url", action="append", default=[], help="a running server's base URL (repeatable)")
    ap.add_argument("--api-key", default=os.environ.get("SPECLLAVA_API_KEY", "unused").split(",")[0],
                    help="the key for --url servers (default: the first of $SPECLLAVA_API_KEY)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8], help="levels (default: 1 2 4 8)")
    ap.add_argument("--requests", type=int, default=8, help="requests per level (default: 8, one per photo)")
    ap.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (default: 64)")
    ap.add_argument("--repeat", type=int, default=3, help="sweeps over all levels and servers (default: 3)")
    ap.add_argument("--out", type=Path, default=Path("runs/serve_load"),
                    help="folder for serve_load.json/.png, rewritten after every run (default: runs/serve_load)")
    ap.add_argument("--summarize", type=Path, default=None, metavar="JSON",
                    help="only print the summary of a serve_load.json (e.g. of a sweep stopped early) and redraw its plot")
    opts = ap.parse_args(argv)
    if opts.summarize is not None:
        report = json.loads(opts.summarize.read_text())
        write_report(report, opts.summarize.parent)
        print_summary(report)
        return report
    if not opts.server and not opts.url:
        opts.server = [""]
    if min(opts.concurrency) < 1 or opts.requests < 1 or opts.max_tokens < 1 or opts.repeat < 1:
        ap.error("--concurrency, --requests, --max-tokens and --repeat must be >= 1")
    opts.out.mkdir(parents=True, exist_ok=True)
    prompts = photo_messages()
    names = [f"serve {a}".strip() for a in opts.server] + list(opts.url)
    report = {"command": shlex.join(["python", "tools/serve_load.py", *(sys.argv[1:] if argv is None else argv)]),
              "concurrency": sorted(set(opts.concurrency)), "requests": opts.requests, "max_tokens": opts.max_tokens,
              "repeat": opts.repeat, "cpus": os.cpu_count(), "load_average_before": os.getloadavg()}
    with ExitStack() as stack:
        urls = [stack.enter_context(started_server(a, opts.out / f"server{i}.log")) for i, a in enumerate(opts.server)]
        urls += opts.url
        keys = ["unused"] * len(opts.server) + [opts.api_key] * len(opts.url)
        report["servers"] = [{"name": name, "url": u, "health": _health(u), "runs": []} for name, u in zip(names, urls)]
        for u, k in zip(urls, keys):  # warm-up: the first request pays one-time costs
            run_level(u, k, prompts, 1, 1, opts.max_tokens)
        for rep in range(opts.repeat):
            for n in opts.concurrency:
                for s, (u, k) in enumerate(zip(urls, keys)):
                    run = run_level(u, k, prompts, n, opts.requests, opts.max_tokens)
                    report["servers"][s]["runs"].append(run)
                    report["load_average_after"] = os.getloadavg()
                    write_report(report, opts.out)
                    print(f"[{rep + 1}/{opts.repeat}] {names[s]}: {n} concurrent: {run['tokens_per_s']:.1f} tokens/s, "
                          f"latency p50 {run['latency_p50_s']:.2f} s, p95 {run['latency_p95_s']:.2f} s, server CPU "
                          f"{run['server_cpu_s'] or float('nan'):.1f} s", flush=True)
    print_summary(report)
    print(f"wrote {opts.out / 'serve_load.json'} and {opts.out / 'serve_load.png'}")
    return report


if __name__ == "__main__":
    # a SIGTERM ends the sweep as Ctrl-C does: the servers it started are stopped on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
