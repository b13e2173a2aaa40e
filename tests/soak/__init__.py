"""Minutes long: ``make soak`` (1,000 reloads under load), not ``make test``."""
