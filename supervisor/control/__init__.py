"""The control plane: the unix control socket and its JSON-lines protocol."""
