"""Kernel and OS details, each module behind a narrow API."""
