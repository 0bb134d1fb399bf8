"""Runtimes found in DNS: `--runtimes dns+http://NAME:PORT` means every address behind NAME.

A Kubernetes headless Service answers its name with one A (or AAAA) record per ready pod, so
resolving it again and again is the fleet's membership list: a pod that starts shows up, one
that is deleted (and so drains) drops out. The router asks `urls()` at every probe round; the
name is resolved again once `interval_s` has passed since the last answer.

Failures keep the last answer: a DNS server that times out or answers SERVFAIL says nothing
about the runtimes, and dropping them all would turn a DNS hiccup into an outage. A name
that does not exist (NXDOMAIN) or has no address records is an answer: no runtimes there
(a Deployment scaled to zero).

Resolution goes through the system resolver (`getaddrinfo`: /etc/resolv.conf, with its
search domains) unless `server` ("HOST:PORT", LORAGATE_DNS_SERVER) is given; then A and AAAA
queries go to that server over UDP with EDNS0 (a hundred A records do not fit in 512
bytes), retried over TCP when the answer is truncated anyway. With a server, give the name
fully qualified: no search domain is applied.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gateway.settings import DNS_SCHEMES, split_host_port

logger = logging.getLogger("loragate.gateway.discovery")

TYPE_A, TYPE_AAAA, TYPE_OPT = 1, 28, 41
RCODE_NXDOMAIN = 3
FLAG_RD, FLAG_TC, FLAG_QR = 0x0100, 0x0200, 0x8000
EDNS_PAYLOAD = 4096  # what we accept over UDP; 100 A records take ~1.7 kB with the header


class DnsUnavailable(Exception):
    """No answer worth believing (timeout, SERVFAIL, REFUSED, a malformed reply)."""


@dataclass(frozen=True, slots=True)
class Target:
    """One `dns+SCHEME://NAME:PORT` entry of LORAGATE_RUNTIMES."""

    scheme: str  # "http" or "https"
    name: str
    port: int

    @classmethod
    def parse(cls, url: str) -> Target:
        if not url.startswith(DNS_SCHEMES):
            raise ValueError(f"not a dns+ runtime: {url!r}")
        scheme, rest = url[len("dns+"):].split("://", 1)
        name, port = split_host_port(rest.rstrip("/"))
        return cls(scheme, name, port)

    def url(self, address: str) -> str:
        host = f"[{address}]" if ":" in address else address
        return f"{self.scheme}://{host}:{self.port}"


class DnsDiscovery:
    def __init__(
        self,
        urls: Sequence[str],
        *,
        server: str | None = None,
        interval_s: float = 10.0,
        timeout_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.targets = [Target.parse(u) for u in urls]
        self.server = split_host_port(server) if server else None
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.clock = clock
        self.failures = 0  # resolutions that kept the last answer, for /metrics
        self._addresses: dict[Target, frozenset[str]] = {}
        self._due = 0.0

    async def urls(self) -> frozenset[str]:
        """The runtime URLs behind every name, resolved again when `interval_s` has passed."""
        if self.clock() >= self._due:
            await self.resolve()
        return frozenset(t.url(a) for t, addresses in self._addresses.items() for a in addresses)

    async def resolve(self) -> None:
        """Resolve every name now; a name that fails keeps its previous addresses."""
        results = await asyncio.gather(*(self._lookup(t.name) for t in self.targets),
                                       return_exceptions=True)
        for target, result in zip(self.targets, results, strict=True):
            if isinstance(result, BaseException):
                self.failures += 1
                logger.warning("DNS lookup of %s failed, keeping %d runtimes: %s", target.name,
                               len(self._addresses.get(target, ())), result)
                continue
            if result != self._addresses.get(target):
                logger.info("DNS %s: %d runtimes", target.name, len(result))
            self._addresses[target] = result
        self._due = self.clock() + self.interval_s

    async def _lookup(self, name: str) -> frozenset[str]:
        if self.server is None:
            return await _getaddrinfo(name)
        answers = await asyncio.gather(*(query(self.server, name, qtype, self.timeout_s)
                                         for qtype in (TYPE_A, TYPE_AAAA)))
        return frozenset().union(*answers)


async def _getaddrinfo(name: str) -> frozenset[str]:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        no_such = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}
        if exc.errno in no_such:
            return frozenset()
        raise DnsUnavailable(str(exc)) from None
    return frozenset(str(info[4][0]) for info in infos)


async def query(server: tuple[str, int], name: str, qtype: int, timeout_s: float
                ) -> frozenset[str]:
    """The addresses of `name`'s `qtype` records, asked of `server` (UDP, then TCP if cut)."""
    qid = secrets.randbelow(1 << 16)
    packet = encode_query(qid, name, qtype)
    try:
        reply = await asyncio.wait_for(_udp(server, packet), timeout_s)
        if struct.unpack_from("!H", reply, 2)[0] & FLAG_TC:
            reply = await asyncio.wait_for(_tcp(server, packet), timeout_s)
    except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
        raise DnsUnavailable(f"{server[0]}:{server[1]}: {type(exc).__name__}") from None
    return decode_answer(reply, qid, qtype)


def encode_query(qid: int, name: str, qtype: int) -> bytes:
    """One question, recursion desired, with an EDNS0 OPT record offering EDNS_PAYLOAD bytes."""
    header = struct.pack("!HHHHHH", qid, FLAG_RD, 1, 0, 0, 1)
    labels = b"".join(bytes([len(p)]) + p for p in name.rstrip(".").encode("idna").split(b"."))
    question = labels + b"\x00" + struct.pack("!HH", qtype, 1)
    opt = b"\x00" + struct.pack("!HHIH", TYPE_OPT, EDNS_PAYLOAD, 0, 0)
    return header + question + opt


def decode_answer(reply: bytes, qid: int, qtype: int) -> frozenset[str]:
    """The `qtype` addresses in a reply's answer section (NXDOMAIN: none)."""
    try:
        rid, flags, qdcount, ancount = struct.unpack_from("!HHHH", reply, 0)
        if rid != qid or not flags & FLAG_QR:
            raise DnsUnavailable("a reply to another question")
        rcode = flags & 0x000F
        if rcode == RCODE_NXDOMAIN:
            return frozenset()
        if rcode != 0:
            raise DnsUnavailable(f"rcode {rcode}")
        offset = 12
        for _ in range(qdcount):
            offset = _skip_name(reply, offset) + 4
        found: set[str] = set()
        for _ in range(ancount):
            offset = _skip_name(reply, offset)
            rtype, _rclass, _ttl, length = struct.unpack_from("!HHIH", reply, offset)
            offset += 10
            data = reply[offset:offset + length]
            offset += length
            # A CNAME chain (an ExternalName Service) puts CNAMEs first: only addresses count.
            if rtype == qtype == TYPE_A and length == 4:
                found.add(str(ipaddress.IPv4Address(data)))
            elif rtype == qtype == TYPE_AAAA and length == 16:
                found.add(str(ipaddress.IPv6Address(data)))
    except (struct.error, IndexError) as exc:
        raise DnsUnavailable("malformed reply") from exc
    return frozenset(found)


def _skip_name(reply: bytes, offset: int) -> int:
    while True:
        length = reply[offset]
        if length & 0xC0 == 0xC0:  # a compression pointer ends the name
            return offset + 2
        offset += 1 + length
        if length == 0:
            return offset


class _Datagram(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: object) -> None:
        if not self.reply.done():
            self.reply.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.reply.done():
            self.reply.set_exception(exc)


async def _udp(server: tuple[str, int], packet: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(_Datagram, remote_addr=server)
    try:
        transport.sendto(packet)
        return await protocol.reply
    finally:
        transport.close()


async def _tcp(server: tuple[str, int], packet: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(*server)
    try:
        writer.write(struct.pack("!H", len(packet)) + packet)
        await writer.drain()
        (length,) = struct.unpack("!H", await reader.readexactly(2))
        return await reader.readexactly(length)
    finally:
        writer.close()
