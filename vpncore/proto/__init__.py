"""Sans-IO protocol core: bytes and `now` in, bytes and events out (SPEC §1).

Nothing in this package touches sockets, file descriptors, clocks, randomness
sources or logging: time and randomness are parameters.
"""
