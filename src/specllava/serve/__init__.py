"""Serving: an OpenAI-compatible HTTP server over `SpeculativeDecoder` (`specllava serve`).

  protocol  the request format, its validation and OpenAI's error shape
  engine    the bounded FIFO queue and the worker threads that decode, stream and stop
  metrics   the Prometheus metrics
  app       the FastAPI app (endpoints, server-sent events, the web page in static/)
  cli       the `specllava serve` subcommand

Nothing is imported here, so `specllava --help` does not load FastAPI.
"""

