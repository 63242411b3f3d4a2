"""The server's Prometheus metrics (`GET /metrics`), kept with prometheus_client in a registry of
the app's own (so several apps in one process, as in the tests, count separately).

  specllava_requests_total{status}                 chat-completion requests answered, by HTTP status
  specllava_finished_total{reason}                 generations by how they ended (eos, max_tokens,
                                                   stop_sequence, time_limit, client_disconnected)
  specllava_prompt_tokens_total                    prompt tokens of finished generations
  specllava_completion_tokens_total                tokens generated
  specllava_target_forwards_total                  target forward passes (prefill included)
  specllava_draft_tokens_proposed_total            draft tokens the target verified
  specllava_draft_tokens_accepted_total            draft tokens it accepted
  specllava_mean_accepted_length                   completion tokens / target forwards, all requests
  specllava_request_mean_accepted_length           histogram of it per request
  specllava_queue_length                           requests waiting for a worker
  specllava_running_requests                       requests decoding now
  specllava_request_latency_seconds                histogram: queued (after its checks) to last token
  specllava_time_to_first_token_seconds            histogram: queued to first token
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the app)

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
_TAU_BUCKETS = (1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 8)


class Metrics:
    def __init__(self, queue_length=lambda: 0, running=lambda: 0):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("specllava_requests", "Chat-completion requests answered, by HTTP status", ["status"], registry=r)
        self.finished = Counter("specllava_finished", "Generations by how they ended", ["reason"], registry=r)
        self.prompt_tokens = Counter("specllava_prompt_tokens", "Prompt tokens of finished generations", registry=r)
        self.completion_tokens = Counter("specllava_completion_tokens", "Tokens generated", registry=r)
        self.target_forwards = Counter("specllava_target_forwards", "Target forward passes, prefill included", registry=r)
        self.proposed = Counter("specllava_draft_tokens_proposed", "Draft tokens the target verified", registry=r)
        self.accepted = Counter("specllava_draft_tokens_accepted", "Draft tokens the target accepted", registry=r)
        self.mean_accepted = Gauge("specllava_mean_accepted_length",
                                   "Tokens generated per target forward over all finished requests (bonus included)", registry=r)
        self.request_tau = Histogram("specllava_request_mean_accepted_length", "Mean accepted length of each request",
                                     buckets=_TAU_BUCKETS, registry=r)
        Gauge("specllava_queue_length", "Requests waiting for a worker", registry=r).set_function(queue_length)
        Gauge("specllava_running_requests", "Requests decoding now", registry=r).set_function(running)
        self.latency = Histogram("specllava_request_latency_seconds", "From queueing (after the checks) to the last token",
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("specllava_time_to_first_token_seconds", "From queueing (after the checks) to the first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self._tokens = self._forwards = 0
        self._lock = threading.Lock()  # finish() runs in the worker threads

    def finish(self, prompt_tokens: int, result: dict, latency_s: float) -> None:
        """Record a finished generation (from a worker thread)."""
        s = result["stats"]
        self.finished.labels(s["stopped_by"]).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.completion_tokens.inc(s["completion_tokens"])
        self.target_forwards.inc(s["target_forwards"])
        self.proposed.inc(s["draft_tokens_proposed"])
        self.accepted.inc(s["draft_tokens_accepted"])
        with self._lock:
            self._tokens += s["completion_tokens"]
            self._forwards += s["target_forwards"]
            self.mean_accepted.set(self._tokens / max(self._forwards, 1))
        self.request_tau.observe(s["mean_accepted_length"])
        self.latency.observe(latency_s)
        if s["time_to_first_token_s"] is not None:
            self.ttft.observe(s["time_to_first_token_s"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
