"""``python -m supervisor.daemon``: ``supervisord`` (an upgrade re-executes
a daemon started this way the same way)."""

from supervisor.daemon.startup import main

main()
