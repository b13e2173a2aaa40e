"""What the daemon tells: metrics and their exposition (text and HTTP),
certificate expiry, logs."""
