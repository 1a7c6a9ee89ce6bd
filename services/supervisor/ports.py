"""The pool of ports backends listen on: configured range, ports in use by anyone skipped."""

from __future__ import annotations

import socket


def port_is_free(host: str, port: int) -> bool:
    """True when nothing listens on host:port (a TIME_WAIT leftover does not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


class PortPool:
    def __init__(self, host: str, first: int, last: int) -> None:
        self.host = host
        self.first = first
        self.last = last
        self._held: set[int] = set()

    @property
    def held(self) -> frozenset[int]:
        return frozenset(self._held)

    def acquire(self, prefer: int | None = None) -> int:
        """A free port of the range, `prefer` if it is still free; raises when the range is exhausted."""
        if prefer is not None and self.first <= prefer <= self.last:
            self._held.discard(prefer)
            if port_is_free(self.host, prefer):
                self._held.add(prefer)
                return prefer
        for port in range(self.first, self.last + 1):
            if port not in self._held and port_is_free(self.host, port):
                self._held.add(port)
                return port
        raise PortsExhausted(
            f"no free port in {self.first}-{self.last} on {self.host} "
            f"({len(self._held)} held by backends); widen LMC_SUPERVISOR_PORT_RANGE_END"
        )

    def release(self, port: int) -> None:
        self._held.discard(port)


class PortsExhausted(Exception):
    pass
