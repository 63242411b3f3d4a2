"""Replicas on Ray Serve: the same app (`create_app` over an `Engine`), N copies behind Ray's HTTP
proxy, on one machine or a Ray cluster (docs/serving.md).

    specllava serve --replicas 2 [--max-replicas 4] [--ray-address auto] [serve's other flags]
    serve run specllava.serve.ray:build_app replicas=2 target=DIR draft=DIR   # Ray's own CLI / config files

Each replica (`Replica`, a Ray Serve deployment with the app as its ASGI ingress) loads the models
and runs its own engine, queue and metrics, exactly as `specllava serve` does; Ray's proxy spreads
requests over the replicas (least-loaded of two picked at random) and Ray's autoscaler adds
replicas between --replicas and --max-replicas from the requests in flight. Ray lets each replica
take up to --max-batch + --max-queue requests, so a replica's own queue bound (429) and time
limits apply as on one server. Every response says which replica answered (`X-Specllava-Replica`).

Ray is an optional dependency (`pip install 'specllava[ray]'`, which `make setup` installs): only
this module imports it.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from ray import serve


@serve.deployment(name="specllava")
@serve.ingress()
class Replica:
    """One replica: `specllava serve`'s engine and app, built from its parsed flags (a dict)."""

    def __init__(self, flags: dict):
        from .app import create_app
        from .cli import build_engine, limits_from_args, security_from_args

        args = argparse.Namespace(**flags)
        self.engine = build_engine(args)
        self.asgi = create_app(self.engine, limits_from_args(args), security_from_args(args))
        self.asgi.state.replica = serve.get_replica_context().replica_id.unique_id

    def __serve_build_asgi_app__(self):
        return self.asgi

    def check_health(self) -> None:
        """Ray restarts a replica whose scheduler died."""
        if not self.engine.thread.is_alive():
            raise RuntimeError("the scheduler of this replica has stopped")

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


def deployment(flags: dict):
    """The `Replica` deployment with Ray's settings from the flags: a fixed number of replicas, or
    autoscaling between --replicas and --max-replicas on the requests in flight per replica."""
    n, most = flags["replicas"], flags.get("max_replicas") or flags["replicas"]
    if most < n:
        raise ValueError(f"--max-replicas ({most}) must be at least --replicas ({n})")
    options = dict(
        max_ongoing_requests=flags["max_batch"] + flags["max_queue"],
        ray_actor_options={"num_cpus": flags.get("replica_cpus") or 1},
    )
    if most > n:
        options["autoscaling_config"] = {"min_replicas": n, "max_replicas": most, "initial_replicas": n,
                                         "target_ongoing_requests": flags["max_batch"]}
    else:
        options["num_replicas"] = n
    return Replica.options(**options)


def replica_flags(args: argparse.Namespace) -> dict:
    """The parsed flags a replica needs, as a plain dict (what Ray ships to each replica). The API
    keys are resolved here, where the command runs: a replica on another machine does not see
    this machine's $SPECLLAVA_API_KEY."""
    from .cli import security_from_args

    flags = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "command"}
    flags["api_key"] = list(security_from_args(args).api_keys) or None
    return flags


def build_app(cli_args: dict[str, str]):
    """For `serve run specllava.serve.ray:build_app key=value ...` and Ray Serve config files: the
    keys are `specllava serve`'s flags without the dashes (replicas=2, target=DIR, max_queue=16)."""
    from ..cli import build_parser

    argv = ["serve"]
    for key, value in cli_args.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    args = build_parser().parse_args(argv)
    flags = replica_flags(args)
    flags["replicas"] = flags.get("replicas") or 1
    return deployment(flags).bind(flags)


def run(args: argparse.Namespace) -> int:
    """`specllava serve --replicas N`: start (or join, --ray-address) Ray, run the replicas behind
    Ray's HTTP proxy on --host/--port, and wait for Ctrl-C or SIGTERM."""
    import ray

    flags = replica_flags(args)
    app = deployment(flags).bind(flags)  # checks the replica settings before Ray starts
    ray.init(address=args.ray_address, include_dashboard=False, logging_level="warning")
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        print(f"specllava serve: starting {args.replicas} replica(s) on Ray, each loading the models ...",
              file=sys.stderr, flush=True)
        serve.run(app, name="specllava", route_prefix="/")
        print(f"specllava serve: ready at http://{args.host}:{args.port}/ ({args.replicas} replica(s) on Ray; "
              f"model {args.served_model_name!r})", file=sys.stderr, flush=True)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
