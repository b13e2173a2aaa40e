"""The fast tier (``make test-fast``): fakes, trio's autojump clock and
short subprocesses; unprivileged, in seconds."""
