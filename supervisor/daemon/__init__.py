"""The process: the command line and the three ways to start, the daemon and
its reloads, the in-place upgrade and what a start takes over, systemd's
notify protocol and signals. ``python -m supervisor.daemon`` is
``supervisord``."""
