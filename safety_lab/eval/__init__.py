"""Evaluation as generate → judge → metric, producing the flat metrics of metrics.json (docs/architecture.md)."""
