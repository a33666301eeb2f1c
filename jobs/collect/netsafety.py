"""Refuse image URLs that point into our own network (SSRF), unless the user allowed it.

Image URLs come from search results, i.e. from strangers: a result, or any redirect hop of it,
could name http://169.254.169.254/ (cloud metadata), http://localhost:8080/ or a LAN service.
Two layers guard every download:

- ``AddressPolicy.check_url`` runs before each request and each redirect hop: scheme, host and
  every address the host resolves to. A refused hop is never connected to.
- ``make_pool_manager`` makes connections that resolve again at connect time and connect to the
  checked IP address itself, so a DNS answer that changes between check and connect
  (DNS rebinding) cannot reach a private address either.

With a proxy configured (HTTP(S)_PROXY, NO_PROXY) the proxy makes the connection; only the first
layer applies.

The same connection classes hand their socket to the download's deadline (``deadline.attach_socket``)
before a response is read, with or without the address check.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util import connection

from .deadline import attach_socket

ALLOWED_SCHEMES = ("http", "https")
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class UnsafeURL(ValueError):
    """A URL (or redirect target) the address policy refuses; the message says why."""


def _address_kind(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why ``ip`` is not a public internet address, or None when it is."""
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_multicast:
        return "multicast"
    if ip.is_private:
        return "private"
    if ip.is_reserved or not ip.is_global:
        return "reserved"
    return None


@dataclass(frozen=True)
class AddressPolicy:
    """Which addresses downloads may connect to.

    ``allow_private`` (config ``allow_private_addresses``) turns the address check off;
    ``allowed_networks`` are narrower exceptions (a test server on 127.0.0.1 while 10.0.0.0/8 stays refused).
    """

    allow_private: bool = False
    allowed_networks: tuple[IPNetwork, ...] = ()

    def address_problem(self, address: str) -> str | None:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1
        if self.allow_private or any(ip in net for net in self.allowed_networks):
            return None
        return _address_kind(ip)

    def checked_addresses(self, host: str, port: int) -> list[str]:
        """Resolve ``host``; every address must pass, or UnsafeURL. DNS errors propagate (socket.gaierror)."""
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
        for address in addresses:
            problem = self.address_problem(address)
            if problem:
                shown = host if host == address else f"{host} ({address})"
                raise UnsafeURL(f"refused {problem} address {shown}; "
                                "set allow_private_addresses only for local testing")
        return addresses

    def check_url(self, url: str) -> None:
        """Raise UnsafeURL unless ``url`` is http(s) with a host that resolves only to allowed addresses."""
        try:
            parts = urlsplit(url)
            scheme = parts.scheme.lower()
            host, port = parts.hostname, parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            raise UnsafeURL(f"refused malformed URL {url[:100]!r}") from None
        if scheme not in ALLOWED_SCHEMES:
            raise UnsafeURL(f"refused scheme '{parts.scheme}:' (only http and https are fetched)")
        if not host:
            raise UnsafeURL("refused URL without a host")
        if self.allow_private:
            return
        try:
            self.checked_addresses(host, port)
        except socket.gaierror:
            return  # unresolvable: the request fails as a connection error; the connect-time check still applies
        except UnicodeError:
            raise UnsafeURL(f"refused invalid host name {host[:100]!r}") from None


class _GuardedConnectionMixin:
    """Resolve at connect time, check every address, connect to the checked IP (not the name again)."""

    policy: AddressPolicy
    host: str
    port: int
    timeout: float | None
    source_address: tuple[str, int] | None
    socket_options: list | None

    def _new_conn(self) -> socket.socket:
        dns_host = getattr(self, "_dns_host", self.host).strip("[]")
        try:
            addresses = self.policy.checked_addresses(dns_host, self.port)
        except socket.gaierror as e:
            raise NameResolutionError(self.host, self, e) from e  # type: ignore[arg-type]
        error: Exception | None = None
        for address in addresses:
            try:
                return connection.create_connection((address, self.port), self.timeout,
                                                    source_address=self.source_address,
                                                    socket_options=self.socket_options)
            except TimeoutError:
                error = ConnectTimeoutError(self, f"connecting to {self.host} timed out ({self.timeout} s)")
            except OSError as e:
                error = NewConnectionError(self, f"Failed to establish a new connection: {e}")  # type: ignore[arg-type]
        assert error is not None  # getaddrinfo never returns an empty list
        raise error


class _DeadlineConnectionMixin:
    """Put the socket under the calling thread's download deadline before the status line is read."""

    sock: socket.socket | None

    def getresponse(self):  # type: ignore[no-untyped-def]  # urllib3's own signature
        attach_socket(self.sock)
        return super().getresponse()  # type: ignore[misc]


def _pool(pool_cls: type[HTTPConnectionPool], conn_cls: type[HTTPConnection],
          policy: AddressPolicy) -> type[HTTPConnectionPool]:
    mixins: tuple[type, ...] = (_DeadlineConnectionMixin,)
    if not policy.allow_private:
        mixins += (_GuardedConnectionMixin,)
    conn = type(f"Download{conn_cls.__name__}", (*mixins, conn_cls), {"policy": policy})
    return type(f"Download{pool_cls.__name__}", (pool_cls,), {"ConnectionCls": conn})


def make_pool_manager(policy: AddressPolicy, user_agent: str, maxsize: int, proxy: str | None = None
                      ) -> urllib3.PoolManager:
    """A thread-safe urllib3 PoolManager whose connections obey ``policy`` and the download deadline.

    With ``proxy``, a ProxyManager: the proxy resolves and connects, so only the deadline applies here.
    (urllib3 directly, not requests: it costs less than half the CPU per request, measured in bench/collect.py.)
    """
    headers = {"User-Agent": user_agent}
    manager = (urllib3.ProxyManager(proxy, num_pools=64, maxsize=maxsize, headers=headers) if proxy
               else urllib3.PoolManager(num_pools=64, maxsize=maxsize, headers=headers))
    checked = AddressPolicy(allow_private=True) if proxy else policy
    manager.pool_classes_by_scheme = {
        "http": _pool(HTTPConnectionPool, HTTPConnection, checked),
        "https": _pool(HTTPSConnectionPool, HTTPSConnection, checked),
    }
    return manager
