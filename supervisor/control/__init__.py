"""The operator's side: requests in, snapshots out. The unix control socket
and its JSON-lines protocol, access checks, watched files, and
``supervisorctl`` (``ctl``)."""
