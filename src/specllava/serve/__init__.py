"""Serving: an OpenAI-compatible HTTP server over `SpeculativeDecoder` (`specllava serve`).

  protocol  the request format, its validation and OpenAI's error shape
  engine    the bounded FIFO queue and the batching scheduler that decodes, streams and stops
  security  API keys, allowed hosts, JSON-only bodies, CORS
  ray       replicas on Ray Serve (`--replicas N`)
  metrics   the Prometheus metrics
  app       the FastAPI app (endpoints, server-sent events, the web page in static/)
  cli       the `specllava serve` subcommand

Nothing is imported here, so `specllava --help` does not load FastAPI.
"""

