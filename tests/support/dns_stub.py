"""A DNS server on 127.0.0.1 for discovery tests: A/AAAA records for names, set by the test.

UDP and TCP on one random port (dnslib's servers in threads). `udp_limit` makes UDP answers
over that many bytes come back truncated (TC), as a plain DNS server does without EDNS, so a
test can send the client over to TCP. `fail` answers SERVFAIL to everything.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from dnslib import AAAA, QTYPE, RCODE, RR, A, DNSRecord
from dnslib.server import DNSHandler, DNSLogger, DNSServer


class StubResolver:
    def __init__(self) -> None:
        self.records: dict[str, set[str]] = {}  # name (no trailing dot) -> addresses
        self.fail = False
        self.queries: list[tuple[str, str]] = []  # (name, "udp" | "tcp")
        self._lock = threading.Lock()

    def set(self, name: str, *addresses: str) -> None:
        with self._lock:
            self.records[name] = set(addresses)

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        reply = request.reply()
        name = str(request.q.qname).rstrip(".")
        with self._lock:
            self.queries.append((name, handler.protocol))
            if self.fail:
                reply.header.rcode = RCODE.SERVFAIL
                return reply
            if name not in self.records:
                reply.header.rcode = RCODE.NXDOMAIN
                return reply
            for address in sorted(self.records[name]):
                v6 = ":" in address
                if request.q.qtype == (QTYPE.AAAA if v6 else QTYPE.A):
                    rdata = AAAA(address) if v6 else A(address)
                    reply.add_answer(RR(name, request.q.qtype, rdata=rdata, ttl=5))
        return reply


class _Quiet(DNSLogger):
    def __init__(self) -> None:
        super().__init__(log="-request,-reply,-truncated,-error,-recv,-send,-data")


@contextmanager
def dns_stub(udp_limit: int = 0) -> Iterator[tuple[StubResolver, str]]:
    """(resolver, "127.0.0.1:PORT") while the servers run."""

    class Handler(DNSHandler):
        udplen = udp_limit

    resolver = StubResolver()
    for _ in range(50):  # the UDP port's number may be taken for TCP by another process
        udp = DNSServer(resolver, address="127.0.0.1", port=0, handler=Handler, logger=_Quiet())
        port = udp.server.server_address[1]
        try:
            tcp = DNSServer(resolver, address="127.0.0.1", port=port, tcp=True, handler=Handler,
                            logger=_Quiet())
            break
        except OSError:
            udp.server.server_close()
    else:
        raise RuntimeError("no port free for both UDP and TCP")
    udp.start_thread()
    tcp.start_thread()
    try:
        yield resolver, f"127.0.0.1:{port}"
    finally:
        for server in (udp, tcp):
            server.stop()
            server.server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
