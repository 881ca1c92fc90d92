"""Outbound HTTP to URLs that users supply (notification ``message_endpoint``\\ s).

Two guards, both needed because the URL is chosen by an untrusted user:

* **Where** (SSRF): :class:`EndpointPolicy` refuses URLs with user info and hosts that are, or
  spell, loopback, link-local (cloud metadata at 169.254.169.254 included), unspecified,
  multicast, reserved or otherwise non-global addresses, plus the known metadata addresses,
  unless the operator allowlists networks (``FLP_NOTIFICATION_ALLOWED_NETWORKS``). Private
  ranges (10/8, 172.16/12, 192.168/16, fc00::/7) are allowed by default, because on-premise
  federated learning runs its clients there; ``FLP_NOTIFICATION_ALLOW_PRIVATE_NETWORKS=false``
  refuses them. The check runs at registration on the URL, and again at every connection on
  the addresses the host name resolves to: :class:`GuardedBackend` resolves, checks **every**
  address and then connects to the checked address itself, so a name cannot pass the check
  and then resolve elsewhere (DNS rebinding). TLS still verifies the certificate against the
  URL's host name.
* **How much** (:func:`post_bounded`): one deadline over the whole exchange (resolution,
  connect, send, response headers, body) and at most ``max_response_bytes`` of the response
  body read, undecoded, before the connection is closed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpcore
import httpx

from flplatform.errors import Unprocessable
from flplatform.settings import Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Private networks: allowed unless FLP_NOTIFICATION_ALLOW_PRIVATE_NETWORKS=false.
PRIVATE_NETWORKS: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)
# Cloud instance-metadata services that sit outside the always-refused non-global ranges
# (AWS's IPv6 endpoint lies in fc00::/7). Refused even when an allowlist covers them.
METADATA_ADDRESSES: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(n) for n in ("169.254.169.254/32", "fd00:ec2::254/128", "100.100.100.200/32")
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")


class EndpointRefused(ValueError):
    """The URL or an address it resolves to is not allowed; the message is safe to show."""


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """IPv4 address carried inside an IPv6 one (mapped, NAT64, 6to4): it is what gets reached."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


@dataclass(frozen=True)
class EndpointPolicy:
    allowed_networks: tuple[IPNetwork, ...] = ()
    allow_private: bool = True

    @classmethod
    def from_settings(cls, settings: Settings) -> EndpointPolicy:
        return cls(
            tuple(settings.notification_allowed_networks), settings.notification_allow_private_networks
        )

    def address_allowed(self, address: IPAddress) -> bool:
        if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
            address = ipaddress.IPv6Address(address.compressed.split("%")[0])
        inner = _embedded_ipv4(address)
        if inner is not None and not self.address_allowed(inner):
            return False
        if any(address in net for net in METADATA_ADDRESSES if net.version == address.version):
            return False
        if any(address in net for net in self.allowed_networks if net.version == address.version):
            return True
        if address.is_multicast:
            return False
        if any(address in net for net in PRIVATE_NETWORKS if net.version == address.version):
            return self.allow_private
        if inner is not None:
            return True  # a mapped/NAT64/6to4 form of an allowed IPv4 address
        return address.is_global

    def check_address(self, address: IPAddress) -> None:
        if not self.address_allowed(address):
            raise EndpointRefused(
                "message_endpoint must not point to an internal address (loopback, link-local, cloud metadata, "
                "unspecified, multicast or other non-public ranges this server refuses); the server's operator "
                "can allow networks with FLP_NOTIFICATION_ALLOWED_NETWORKS."
            )

    def check_url(self, url: str) -> tuple[str, int]:
        """Static checks of a URL (no DNS): returns (host, port). Host names are checked again
        on every connection, against the addresses they resolve to."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise EndpointRefused("message_endpoint is not a valid URL.") from None
        if parts.scheme not in ("http", "https"):
            raise EndpointRefused("message_endpoint must be an http:// or https:// URL.")
        if "@" in parts.netloc:
            raise EndpointRefused("message_endpoint must not contain user info (user:password@).")
        host = (parts.hostname or "").rstrip(".").lower()
        if not host:
            raise EndpointRefused("message_endpoint has no host.")
        literal = parse_ip_literal(host)
        if literal is not None:
            self.check_address(literal)
        elif _legacy_ipv4_spelling(host):
            raise EndpointRefused(
                "message_endpoint host is a numeric IPv4 spelling other than dotted decimal "
                "(such as 2130706433 or 0x7f.1); write the address as a.b.c.d."
            )
        elif host in _LOOPBACK_NAMES or host.endswith(".localhost"):
            self.check_address(ipaddress.IPv4Address("127.0.0.1"))
            self.check_address(ipaddress.IPv6Address("::1"))
        return host, port or (443 if parts.scheme == "https" else 80)

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        """Every address ``host`` resolves to, each checked; refuses if any is not allowed (a
        name that mixes public and internal addresses is refused as a whole)."""
        literal = parse_ip_literal(host)
        if literal is not None:
            self.check_address(literal)
            return [literal]
        if _legacy_ipv4_spelling(host):
            raise EndpointRefused("message_endpoint host is a non-canonical numeric IPv4 spelling.")
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses: list[IPAddress] = []
        for _family, _type, _proto, _canon, sockaddr in infos:
            address = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
            if address not in addresses:
                addresses.append(address)
        if not addresses:
            raise OSError(f"{host} resolved to no address")
        for address in addresses:
            self.check_address(address)
        return addresses


def validate_message_endpoint(url: object, settings: Settings) -> None:
    """Registration/update check of a ``message_endpoint`` (None passes): 422 when refused."""
    if url is None:
        return
    try:
        EndpointPolicy.from_settings(settings).check_url(str(url))
    except EndpointRefused as exc:
        raise Unprocessable(str(exc), code="message_endpoint_refused") from None


def parse_ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _legacy_ipv4_spelling(host: str) -> bool:
    """True for hosts the C resolver reads as IPv4 though they are not dotted decimal:
    ``2130706433``, ``0x7f.1``, ``127.1``, ``0177.0.0.1`` (inet_aton's forms)."""
    if not host or any(c not in "0123456789abcdefx." for c in host) or not host[0].isdigit():
        return False
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    return True


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """Network backend that resolves the host itself, checks every address against the policy
    and connects to a checked address (never lets the OS resolve the name a second time)."""

    def __init__(self, policy: EndpointPolicy, inner: httpcore.AsyncNetworkBackend | None = None) -> None:
        self.policy = policy
        self.inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[typing.Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await self.policy.resolve(host, port)
        last: Exception | None = None
        for address in addresses:
            try:
                return await self.inner.connect_tcp(
                    str(address),
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[typing.Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise EndpointRefused("unix sockets are not allowed")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


class _GuardedTransport(httpx.AsyncHTTPTransport):
    def __init__(self, policy: EndpointPolicy, limits: httpx.Limits) -> None:
        # trust_env=False: no proxy from the environment (a proxy would resolve and connect
        # itself, bypassing the address check) and no .netrc credentials.
        super().__init__(trust_env=False, limits=limits)
        ssl_context = httpx.create_ssl_context()  # httpx's own defaults (certifi CA bundle, SSL_CERT_FILE)
        # httpx's transport keeps its connection pool in ``_pool``; ours differs only by the
        # guarded network backend (httpcore's public parameter for exactly this).
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=GuardedBackend(policy),
        )


def guarded_client(settings: Settings) -> httpx.AsyncClient:
    """An HTTP client for user-supplied URLs: address policy on every connection, no redirects,
    no proxies from the environment, per-operation timeouts as a backstop to the total deadline."""
    timeout = settings.notification_timeout_seconds
    limits = httpx.Limits(
        max_connections=settings.notification_max_in_flight,
        max_keepalive_connections=min(20, settings.notification_max_in_flight),
    )
    return httpx.AsyncClient(
        transport=_GuardedTransport(EndpointPolicy.from_settings(settings), limits),
        timeout=httpx.Timeout(timeout),
        follow_redirects=False,
        trust_env=False,
    )


@dataclass
class Outcome:
    status_code: int
    body_prefix: bytes  # at most max_response_bytes, for the server log only


async def post_bounded(
    http: httpx.AsyncClient,
    url: str,
    *,
    content: bytes,
    headers: dict[str, str],
    deadline_seconds: float,
    max_response_bytes: int,
) -> Outcome:
    """POST and read at most ``max_response_bytes`` of the answer, all within one deadline.
    Raises TimeoutError, EndpointRefused, httpx.HTTPError or OSError on failure."""
    async with asyncio.timeout(deadline_seconds):
        async with http.stream(
            "POST", url, content=content, headers={**headers, "Accept-Encoding": "identity"}
        ) as response:
            received = bytearray()
            # Raw bytes: nothing is decompressed, so a small compressed answer cannot expand.
            async for chunk in response.aiter_raw():
                received += chunk[: max_response_bytes - len(received)]
                if len(received) >= max_response_bytes:
                    break
            # Leaving the block closes the stream; a body not read to its end closes the
            # connection instead of returning it to the pool.
            return Outcome(response.status_code, bytes(received))
