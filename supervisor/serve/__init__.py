"""The running services (trio): a service rolls out generations of workers on
their listeners, health-checks them, cuts over and retires the old one."""
