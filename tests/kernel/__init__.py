"""Kernel behaviour the supervisor relies on, checked on the running kernel:
as root, in the tests' private network namespace."""
