"""DNS discovery of runtimes (`--runtimes dns+http://NAME:PORT`) against a stub DNS server on
127.0.0.1, and the router adding and draining runtimes as their records come and go."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from gateway.inference.discovery import DnsDiscovery, Target
from gateway.inference.router import Router
from gateway.settings import ENV_VARS, Settings, SettingsError
from runtime.protocol import FinishEvent, StartEvent, TokenEvent, Usage
from tests.support.dns_stub import dns_stub

pytestmark = pytest.mark.unit
NAME = "loragate-runtime.loragate.svc.cluster.local"
KEY = "cd" * 32


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_settings_split_static_and_dns_runtimes() -> None:
    settings = Settings.from_env(environ={
        "LORAGATE_RUNTIMES": f"http://a:8100, dns+http://{NAME}:8100",
        "LORAGATE_DNS_SERVER": "127.0.0.1:5353",
        "LORAGATE_DNS_INTERVAL_S": "3",
    })
    assert settings.static_runtimes == ("http://a:8100",)
    assert settings.dns_runtimes == (f"dns+http://{NAME}:8100",)
    assert (settings.dns_server, settings.dns_interval_s) == ("127.0.0.1:5353", 3.0)
    assert {"LORAGATE_RUNTIMES", "LORAGATE_DNS_SERVER", "LORAGATE_RUNTIME_TOKEN"} <= ENV_VARS
    assert Target.parse("dns+https://[fd00::1]:443") == Target("https", "fd00::1", 443)


@pytest.mark.parametrize("bad", [f"dns+http://{NAME}", f"dns+http://{NAME}:8100/v1",
                                 "dns://x:1", f"dns+http://{NAME}:0"])
def test_settings_refuse_a_malformed_dns_runtime(bad: str) -> None:
    with pytest.raises(SettingsError):
        Settings.from_env(environ={"LORAGATE_RUNTIMES": bad})


def test_settings_refuse_a_dns_server_without_port() -> None:
    with pytest.raises(SettingsError, match="LORAGATE_DNS_SERVER"):
        Settings.from_env(environ={"LORAGATE_DNS_SERVER": "127.0.0.1"})


async def test_records_added_and_removed_after_re_resolve() -> None:
    clock = Clock()
    with dns_stub() as (stub, server):
        stub.set(NAME, "10.0.0.1", "10.0.0.2")
        discovery = DnsDiscovery([f"dns+http://{NAME}:8100"], server=server, interval_s=10.0,
                                 clock=clock)
        assert await discovery.urls() == {"http://10.0.0.1:8100", "http://10.0.0.2:8100"}
        stub.set(NAME, "10.0.0.2", "10.0.0.3")
        # Not due yet: the last answer stands and nothing is asked.
        asked = len(stub.queries)
        clock.now = 9.9
        assert await discovery.urls() == {"http://10.0.0.1:8100", "http://10.0.0.2:8100"}
        assert len(stub.queries) == asked
        clock.now = 10.0
        assert await discovery.urls() == {"http://10.0.0.2:8100", "http://10.0.0.3:8100"}
        assert len(stub.queries) > asked


async def test_a_failing_server_keeps_the_last_answer_and_nxdomain_empties_it() -> None:
    with dns_stub() as (stub, server):
        stub.set(NAME, "10.0.0.1")
        discovery = DnsDiscovery([f"dns+http://{NAME}:8100"], server=server, interval_s=1.0)
        await discovery.resolve()
        stub.fail = True
        await discovery.resolve()
        assert await discovery.urls() == {"http://10.0.0.1:8100"}
        assert discovery.failures == 1
        stub.fail = False
        del stub.records[NAME]  # the Service is gone or has no ready pod: NXDOMAIN
        await discovery.resolve()
        assert await discovery.urls() == frozenset()
        assert discovery.failures == 1


async def test_an_unreachable_server_keeps_the_last_answer() -> None:
    with dns_stub() as (stub, server):
        stub.set(NAME, "10.0.0.1")
        discovery = DnsDiscovery([f"dns+http://{NAME}:8100"], server=server, timeout_s=0.2)
        await discovery.resolve()
    await discovery.resolve()  # the stub has stopped: no answer comes
    assert discovery.failures == 1
    assert await discovery.urls() == {"http://10.0.0.1:8100"}


async def test_a_hundred_runtimes_over_udp_and_over_tcp_when_truncated() -> None:
    addresses = [f"10.1.0.{i}" for i in range(1, 101)]
    expected = {f"http://{a}:8100" for a in addresses}
    with dns_stub() as (stub, server):
        stub.set(NAME, *addresses)
        discovery = DnsDiscovery([f"dns+http://{NAME}:8100"], server=server)
        assert await discovery.urls() == expected
        assert {proto for _, proto in stub.queries} == {"udp"}  # EDNS0: no truncation
    with dns_stub(udp_limit=512) as (stub, server):
        stub.set(NAME, *addresses)
        discovery = DnsDiscovery([f"dns+http://{NAME}:8100"], server=server)
        assert await discovery.urls() == expected
        assert ("udp" in {p for _, p in stub.queries}) and ("tcp" in {p for _, p in stub.queries})


async def test_ipv6_records_and_several_names() -> None:
    with dns_stub() as (stub, server):
        stub.set(NAME, "fd00::7", "10.0.0.1")
        stub.set("other.example", "10.9.9.9")
        discovery = DnsDiscovery([f"dns+http://{NAME}:8100", "dns+https://other.example:443"],
                                 server=server)
        assert await discovery.urls() == {"http://[fd00::7]:8100", "http://10.0.0.1:8100",
                                          "https://10.9.9.9:443"}


async def test_the_system_resolver_by_default() -> None:
    discovery = DnsDiscovery(["dns+http://localhost:8100"])
    assert "http://127.0.0.1:8100" in await discovery.urls()


class HeldStream:
    """A runtime's answer that finishes only when the test lets it."""

    def __init__(self, release: asyncio.Event) -> None:
        self.release = release

    async def events(self):  # type: ignore[no-untyped-def]
        yield StartEvent(1)
        yield TokenEvent([5], "x", None)
        await self.release.wait()
        yield FinishEvent("length", Usage(1, 1))

    async def aclose(self) -> None:
        pass


class HeldClient:
    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.calls: list[str] = []

    async def open_generate(self, url: str, body: Any, deadline: Any = None) -> HeldStream:
        self.calls.append(url)
        return HeldStream(self.release)

    async def aclose(self) -> None:
        pass


def healthy_http() -> httpx.AsyncClient:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200, json={"status": "ok"})
        return httpx.Response(200, json={"num_running": 0})

    return httpx.AsyncClient(transport=httpx.MockTransport(answer))


async def test_router_adds_and_drains_runtimes_as_records_come_and_go() -> None:
    with dns_stub() as (stub, server):
        stub.set(NAME, "10.0.0.1", "10.0.0.2")
        discovery = DnsDiscovery([f"dns+http://{NAME}:8100"], server=server, interval_s=1.0,
                                 clock=(clock := Clock()))
        client = HeldClient()
        router = Router(healthy_http(), (), client=client, discovery=discovery)
        await router.refresh()
        assert set(router.runtimes) == {"http://10.0.0.1:8100", "http://10.0.0.2:8100"}
        assert all(s.healthy for s in router.runtimes.values())

        stream = router.generate({"request_id": "r"}, KEY)  # type: ignore[arg-type]
        await anext(stream)  # the start event: the request is on its runtime now
        serving = client.calls[-1]
        other = ({"10.0.0.1", "10.0.0.2"} - {serving.split("//")[1].split(":")[0]}).pop()

        stub.set(NAME, other, "10.0.0.3")  # the serving pod leaves, a new one comes
        clock.now = 1.0
        await router.refresh()
        assert set(router.runtimes) == {f"http://{other}:8100", "http://10.0.0.3:8100"}
        assert set(router.draining) == {serving}
        assert serving not in {s.url for s in router.candidates(KEY)}
        assert router.load_figures()["members"] == {"ready": 2, "not_ready": 0, "draining": 1}

        client.release.set()
        assert [type(e).__name__ async for e in stream] == ["TokenEvent", "FinishEvent"]
        await router.refresh()  # nothing in flight there any more: forgotten
        assert router.draining == {}


async def test_a_runtime_back_in_dns_keeps_its_in_flight_count() -> None:
    with dns_stub() as (stub, server):
        stub.set(NAME, "10.0.0.1")
        discovery = DnsDiscovery([f"dns+http://{NAME}:8100"], server=server, interval_s=1.0,
                                 clock=(clock := Clock()))
        client = HeldClient()
        router = Router(healthy_http(), (), client=client, discovery=discovery)
        await router.refresh()
        stream = router.generate({"request_id": "r"}, KEY)  # type: ignore[arg-type]
        await anext(stream)
        stub.set(NAME)  # a DNS answer without the pod (its readiness flapped)
        clock.now = 1.0
        await router.refresh()
        assert router.runtimes == {} and router.draining["http://10.0.0.1:8100"].in_flight == 1
        stub.set(NAME, "10.0.0.1")
        clock.now = 2.0
        await router.refresh()
        assert router.runtimes["http://10.0.0.1:8100"].in_flight == 1
        client.release.set()
        async for _ in stream:
            pass
        assert router.runtimes["http://10.0.0.1:8100"].in_flight == 0
