"""Where backends listen and where they are reached.

The pool of ports backends listen on (configured range, ports in use by anyone skipped) on the
bind host, and the address other hosts reach them at: the advertised host, which differs from the
bind host when backends listen on every interface (0.0.0.0 or ::) of a node in a cluster.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import socket

log = logging.getLogger(__name__)


def is_wildcard(host: str) -> bool:
    """True for an address that means every interface (0.0.0.0, ::), which nobody can connect to."""
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def host_port(host: str, port: int) -> str:
    """HOST:PORT as URLs and gRPC targets write it (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def local_host(bind_host: str) -> str:
    """An address this machine reaches something bound to `bind_host` at (loopback for a wildcard)."""
    if not is_wildcard(bind_host):
        return bind_host
    return "::1" if ipaddress.ip_address(bind_host).version == 6 else "127.0.0.1"


@functools.cache
def advertised_host(bind_host: str, advertise_host: str = "") -> str:
    """Where other hosts reach a backend bound to `bind_host`: `advertise_host` when it names one
    address, else the bind host, else (a wildcard bind) this machine's name resolved to an address.

    Cached, so the resolution (and its log line) happens once per setting.
    """
    if advertise_host and not is_wildcard(advertise_host):
        return advertise_host
    if not is_wildcard(bind_host):
        return bind_host
    name = socket.gethostname()
    address = _resolved(name, ipv4_only=ipaddress.ip_address(bind_host).version == 4)
    log.info(
        "backends bind %s and are advertised at %s (this host's name %s); "
        "set LMC_SUPERVISOR_ADVERTISE_HOST to choose",
        bind_host, address, name,
    )  # fmt: skip
    return address


def _resolved(name: str, *, ipv4_only: bool) -> str:
    """`name` resolved to an address (the name itself when it does not resolve here: other hosts
    may still resolve it, through DNS this machine's resolver does not see)."""
    family = socket.AF_INET if ipv4_only else socket.AF_UNSPEC
    try:
        addresses = [str(info[4][0]) for info in socket.getaddrinfo(name, None, family, socket.SOCK_STREAM)]
    except OSError as error:
        log.warning("cannot resolve this host's name %s (%s)", name, error)
        addresses = []
    if not addresses:
        return name
    # A name that resolves to loopback (Debian's 127.0.1.1) and to a real address: the real one.
    return next((a for a in addresses if not ipaddress.ip_address(a).is_loopback), addresses[0])


def port_is_free(host: str, port: int) -> bool:
    """True when nothing listens on host:port (a TIME_WAIT leftover does not count)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
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
