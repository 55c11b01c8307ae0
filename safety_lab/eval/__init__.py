"""Evaluation as generate → judge → metric (DESIGN.md §3), producing the flat metrics of the result contract (§6)."""
