"""The whole daemon with real processes: workers, client loads, nginx,
gunicorn, Prometheus, real systemd in a namespace of its own."""
