"""Measuring: in-process batch-1 latency of every backend, the HTTP load generator, the
comparison with the reference service, and the report (JSON, Markdown, charts)."""
