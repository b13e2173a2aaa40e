"""A zero-downtime process supervisor for Linux.

The map, from the top of the flow down (docs/design.md tells the flow). A
module imports only from its own folder or from a folder below it;
``tests/unit/test_layers.py`` checks it.

- ``daemon/``: the process. Wiring and entry points: the command line and the
  three ways to start (``startup``), the daemon and its reload queue, the
  in-place upgrade (``upgrade``, and ``handover``, its sequencing against a
  small protocol), systemd's notify protocol, signals, man pages.
- ``control/``: the operator's side. Requests in, snapshots out: the control
  socket and its protocol, access checks, watched files, ``supervisorctl``.
- ``observe/``: what the daemon tells. Metrics and their exposition over
  HTTP, certificate expiry, logs.
- ``serve/``: the running services (trio). A service rolls out generations
  of workers on listeners, health-checks them, cuts over and retires; it
  exports itself for an upgrade and takes over at start (``takeover``,
  ``inherit``).
- ``handoff/``: what crosses an exec or a crash: the state document, the
  ledger of every fd that crosses, by name, and systemd's fd store. Shapes
  and fds only.
- ``plan/``: what a reload will do, decided once (pure): the plan, and the
  kernel's capabilities it is decided on.
- ``config/``: what was asked (pure): the schema, loading and placeholders,
  TLS files, the generated reference.
- ``steering/``: the reuseport groups, eBPF and classic BPF.
- ``kernel/``: the system calls: sockets, processes, BPF, sd_notify, files.
- ``errors``, ``values``, ``status``, ``text``: the error tree, value types,
  the snapshots ``serve/`` writes and ``control/`` reads, printable text.
  Every folder may use them.
- ``demo/``: the demo worker (``python -m supervisor.demo``), on its own.
"""

__version__ = "0.1.0"
