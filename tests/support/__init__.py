"""What the tests (and bench/) share: the daemon harness, fakes, the client
load, certificates, processes, and real systemd in a namespace."""
