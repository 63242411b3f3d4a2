"""The server's Prometheus metrics (`GET /metrics`), kept with prometheus_client in a registry of
the app's own (so several apps in one process, as in the tests, count separately) that also holds
prometheus_client's process, platform and garbage-collector collectors.

  specllava_requests_total{endpoint, status}       API requests answered, by endpoint and HTTP status
  specllava_errors_total{code}                     refused or failed requests, by error code (the
                                                   `code` of the error body, else its `type`)
  specllava_finished_total{reason}                 generations by how they ended (eos, max_tokens,
                                                   stop_sequence, time_limit, client_disconnected)
  specllava_prompt_tokens_total                    prompt tokens of finished generations
  specllava_completion_tokens_total                tokens generated
  specllava_target_forwards_total                  target forward passes (prefill included)
  specllava_draft_tokens_proposed_total            draft tokens the target verified
  specllava_draft_tokens_accepted_total            draft tokens it accepted
  specllava_request_mean_accepted_length           histogram: each request's mean accepted length
  specllava_step_accepted_length                   histogram: tokens emitted by each verification
                                                   step (accepted draft tokens + the bonus token)
  specllava_queue_wait_seconds                     histogram: queued to picked up for decoding
  specllava_batch_size                             histogram: requests decoded together by each step
  specllava_queue_length                           requests waiting for a place in the batch
  specllava_running_requests                       requests decoding now
  specllava_request_latency_seconds                histogram: queued (after its checks) to last token
  specllava_time_to_first_token_seconds            histogram: queued to first token

Ratios (the mean accepted length over all requests, the acceptance rate, tokens/s) are not
exported: they follow from the counters in PromQL (docs/serving.md). No `_created` series.
"""

from __future__ import annotations

import threading

import prometheus_client
from prometheus_client import (CollectorRegistry, Counter, Gauge, GCCollector, Histogram, PlatformCollector,
                               ProcessCollector, generate_latest)
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the app)

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
_WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
_TAU_BUCKETS = (1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 8)
_STEP_BUCKETS = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)

# `_created` series double every counter and histogram for a timestamp Prometheus does not use
prometheus_client.disable_created_metrics()


class Metrics:
    def __init__(self, queue_length=lambda: 0, running=lambda: 0):
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.requests = Counter("specllava_requests", "API requests answered, by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.errors = Counter("specllava_errors", "Refused or failed requests, by error code", ["code"], registry=r)
        self.finished = Counter("specllava_finished", "Generations by how they ended", ["reason"], registry=r)
        self.prompt_tokens = Counter("specllava_prompt_tokens", "Prompt tokens of finished generations", registry=r)
        self.completion_tokens = Counter("specllava_completion_tokens", "Tokens generated", registry=r)
        self.target_forwards = Counter("specllava_target_forwards", "Target forward passes, prefill included", registry=r)
        self.proposed = Counter("specllava_draft_tokens_proposed", "Draft tokens the target verified", registry=r)
        self.accepted = Counter("specllava_draft_tokens_accepted", "Draft tokens the target accepted", registry=r)
        self.request_tau = Histogram("specllava_request_mean_accepted_length", "Mean accepted length of each request",
                                     buckets=_TAU_BUCKETS, registry=r)
        self.step_accepted = Histogram("specllava_step_accepted_length",
                                       "Tokens emitted by each verification step (accepted draft tokens + bonus)",
                                       buckets=_STEP_BUCKETS, registry=r)
        self.queue_wait = Histogram("specllava_queue_wait_seconds", "From queueing to being picked up for decoding",
                                    buckets=_WAIT_BUCKETS, registry=r)
        self.batch_size = Histogram("specllava_batch_size", "Requests decoded together by each decoding step",
                                    buckets=_BATCH_BUCKETS, registry=r)
        Gauge("specllava_queue_length", "Requests waiting for a place in the batch", registry=r).set_function(queue_length)
        Gauge("specllava_running_requests", "Requests decoding now", registry=r).set_function(running)
        self.latency = Histogram("specllava_request_latency_seconds", "From queueing (after the checks) to the last token",
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("specllava_time_to_first_token_seconds", "From queueing (after the checks) to the first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self._lock = threading.Lock()
        self.recent_latency_s: float | None = None  # moving average, for Retry-After (not exported)

    def error(self, code: str | None, type: str) -> None:
        self.errors.labels(code or type).inc()

    def step(self, emitted: int) -> None:
        """Record one verification step that emitted `emitted` tokens (from the scheduler thread)."""
        self.step_accepted.observe(emitted)

    def batch(self, size: int) -> None:
        """Record one decoding step over `size` requests (from the scheduler thread)."""
        self.batch_size.observe(size)

    def started(self, waited_s: float) -> None:
        self.queue_wait.observe(waited_s)

    def finish(self, prompt_tokens: int, result: dict, latency_s: float) -> None:
        """Record a finished generation (from the scheduler thread)."""
        s = result["stats"]
        self.finished.labels(s["stopped_by"]).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.completion_tokens.inc(s["completion_tokens"])
        self.target_forwards.inc(s["target_forwards"])
        self.proposed.inc(s["draft_tokens_proposed"])
        self.accepted.inc(s["draft_tokens_accepted"])
        self.request_tau.observe(s["mean_accepted_length"])
        self.latency.observe(latency_s)
        if s["time_to_first_token_s"] is not None:
            self.ttft.observe(s["time_to_first_token_s"])
        with self._lock:
            last = self.recent_latency_s
            self.recent_latency_s = latency_s if last is None else 0.8 * last + 0.2 * latency_s

    def render(self) -> bytes:
        return generate_latest(self.registry)
