"""What crosses an exec or a crash: the state document of an in-place
upgrade, and the names of what systemd's fd store keeps."""
