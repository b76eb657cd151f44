"""How the process speaks: logs, Prometheus metrics and /health, text for a terminal."""
