"""The one failure mode of everything that parses remote input (SPEC §3)."""


class BadPacket(Exception):
    """A datagram or message from the network that must be dropped silently.

    `reason` is a short, fixed, address-free token used only as a counter name.
    """

    __slots__ = ("reason",)

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason
