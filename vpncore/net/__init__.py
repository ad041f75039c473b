"""I/O layer: the only code that touches file descriptors (TUN, UDP, pump, endpoint)."""
