"""The demo worker: ``python -m supervisor.demo``."""
