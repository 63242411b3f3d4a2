"""Replicas on Ray Serve (`specllava serve --replicas N`, `specllava.serve.ray`): two local replicas
of the tiny pair behind Ray's HTTP proxy, driven by the openai client. Their answers equal a single
server's at temperature 0, and requests are spread over both replicas."""

import concurrent.futures
import os
from pathlib import Path

import openai
import pytest

from serve_helpers import free_port, image_bytes, user

from specllava.cli import build_parser

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
SRC = str(Path(__file__).resolve().parents[2] / "src")


def test_replica_settings_from_the_flags(tiny_paths):
    from specllava.serve.ray import build_app, deployment, replica_flags

    flags = replica_flags(build_parser().parse_args(["serve", "--replicas", "2", "--max-queue", "10"]))
    d = deployment(flags)
    assert d.num_replicas == 2 and d.max_ongoing_requests == 8 + 10 and d.ray_actor_options["num_cpus"] == 1  # --max-batch + --max-queue
    scaled = deployment({**flags, "max_replicas": 5})
    assert (scaled._deployment_config.autoscaling_config.min_replicas,
            scaled._deployment_config.autoscaling_config.max_replicas) == (2, 5)
    with pytest.raises(ValueError, match="at least --replicas"):
        deployment({**flags, "max_replicas": 1})
    app = build_app({"replicas": "3", "target": str(tiny_paths.target_dir), "draft": str(tiny_paths.draft_dir)})
    assert app._bound_deployment.num_replicas == 3


def test_replicas_get_the_keys_of_the_machine_that_starts_them(monkeypatch):
    import argparse

    from specllava.serve.cli import security_from_args
    from specllava.serve.ray import replica_flags

    monkeypatch.setenv("SPECLLAVA_API_KEY", "k1,k2")
    flags = replica_flags(build_parser().parse_args(["serve", "--replicas", "2"]))
    monkeypatch.delenv("SPECLLAVA_API_KEY")  # a replica on another machine
    assert security_from_args(argparse.Namespace(**flags)).api_keys == ("k1", "k2")


def test_ray_flags_need_replicas():
    from specllava.cli import main

    assert main(["serve", "--max-replicas", "3"]) == 2


@pytest.mark.slow  # Ray's processes and two replicas importing torch and transformers: ~40 s here
def test_two_replicas_answer_as_one_server_and_share_the_requests(tiny_paths):
    from ray import serve

    from specllava.serve.ray import deployment, replica_flags

    args = build_parser().parse_args([
        "serve", "--target", str(tiny_paths.target_dir), "--draft", str(tiny_paths.draft_dir), "--dtype", "float32",
        "--threads", "1", "--max-tokens", "16", "--replicas", "2", "--replica-cpus", "0.5"])  # fmt: skip
    prompts = [user(f"Picture {i}", image_bytes(i)) for i in range(3)] + [user("Name three colours.")]
    alone = _single_server_answers(args, prompts)
    os.environ["PYTHONPATH"] = SRC + os.pathsep + os.environ.get("PYTHONPATH", "")  # the replicas import this tree
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        flags = replica_flags(args)
        serve.run(deployment(flags).bind(flags), name="specllava", route_prefix="/")
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)

        def ask(messages):
            raw = c.chat.completions.with_raw_response.create(model="specllava", messages=messages, max_tokens=16)
            return raw.parse().choices[0].message.content, raw.headers["x-specllava-replica"]

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, prompts * 4))
        assert [text for text, _ in answers] == alone * 4
        assert len({replica for _, replica in answers}) == 2, "the requests all went to one replica"
        streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model="specllava", messages=prompts[0], max_tokens=16, stream=True) if ch.choices)
        assert streamed == alone[0]
    finally:
        serve.shutdown()
        ray.shutdown()


def _single_server_answers(args, prompts) -> list[str]:
    """The answers of one `specllava serve` built from the same flags (same loading, same thread
    count), in this process."""
    import threading
    import time

    import torch
    import uvicorn

    from specllava.serve.cli import build

    threads = torch.get_num_threads()
    app, engine = build(args)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.02)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{server.config.port}/v1", api_key="unused", max_retries=0)
        return [c.chat.completions.create(model="specllava", messages=m, max_tokens=16).choices[0].message.content
                for m in prompts]
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        engine.close()
        torch.set_num_threads(threads)
