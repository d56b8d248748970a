"""Latency: timing, runtimes, per-layer latency tables and latency-aware planning."""
