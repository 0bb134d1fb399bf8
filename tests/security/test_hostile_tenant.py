"""Issue 12, the whole scenario: a hostile tenant next to a victim on one real runtime.

A real `loragate runtime` (with LORAGATE_RUNTIME_TOKEN, confined to the gateway's store) and
a real `loragate serve --runtimes` in front of it. The victim records greedy answers; then,
while the victim keeps asking, an attacker
- uploads the victim's weights' bytes as its own adapter with another lora_alpha, and uses it;
- gets past upload (which now refuses hostile values) by writing hostile artifacts into the
  store and calling the runtime directly with the runtime token: a lora_B of 3e38, an alpha
  of 1e308, and /etc/passwd as an artifact URI;
- calls the runtime without the token.
The victim's answers are identical to the recorded ones during and after; the attacker's
same-bytes version is served with its own alpha (PEFT oracle); every hostile call fails
alone, with its own error.
"""

from __future__ import annotations

import json
import secrets
import shutil
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from runtime.model.weights import ModelArgs
from runtime.types import AdapterRef
from tests.support.fault_procs import new_tenant, start_gateway, start_runtimes, upload
from tests.support.gw_helpers import bearer
from tests.support.hostile import HOSTILE_B, crafted_ref, publish

PROMPTS = ("The old lighthouse keeper", "Numbers: 3, 1, 4", "Dear tenant,")
MAX_TOKENS = 8


def runtime_generate(url: str, token: str | None, request_id: str, prompt: str,
                     adapter: AdapterRef | None, ignore_eos: bool = False) -> httpx.Response:
    """One direct /generate call (what only a gateway should be able to make)."""
    body: dict[str, Any] = {
        "request_id": request_id, "prompt": prompt,
        "sampling": {"max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": ignore_eos},
    }
    if adapter is not None:
        body["adapter"] = {"key": adapter.key, "sha256": adapter.sha256, "uri": adapter.uri,
                           "rank": adapter.rank, "alpha": adapter.alpha,
                           "target_modules": list(adapter.target_modules),
                           "use_rslora": adapter.use_rslora, "name": adapter.name}
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.post(f"{url}/generate", json=body, headers=headers, timeout=120)


def events(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    return [json.loads(line) for line in response.text.splitlines() if line]


def token_ids(evs: list[dict[str, Any]]) -> list[int]:
    return [t for e in evs if e["type"] == "token" for t in e["token_ids"]]


def text_of(evs: list[dict[str, Any]]) -> str:
    return "".join(e["text"] for e in evs if e["type"] == "token")


def complete(gateway: str, key: str, model: str, prompt: str) -> tuple[int, str, Any]:
    response = httpx.post(f"{gateway}/v1/completions", headers=bearer(key), timeout=120,
                          json={"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS,
                                "temperature": 0})
    if response.status_code != 200:
        return response.status_code, response.text, None
    choice = response.json()["choices"][0]
    return 200, choice["text"], choice["finish_reason"]


@pytest.mark.slow
def test_a_hostile_tenant_changes_nothing_for_the_victim(
    tmp_path: Path, base_model_dir: Path
) -> None:
    from runtime.model.tokenizer import Tokenizer
    from tests.support.lora_oracle import SPECS, load_peft_multi, make_peft_adapter, peft_greedy

    spec = SPECS[4]  # q/v, rank 8, alpha 32
    victim_dir, mimic_dir = tmp_path / "victim-adapter", tmp_path / "mimic-adapter"
    make_peft_adapter(base_model_dir, victim_dir, spec)
    shutil.copytree(victim_dir, mimic_dir)  # the same weights' bytes ...
    mimic_config = json.loads((mimic_dir / "adapter_config.json").read_text())
    mimic_config["lora_alpha"] = 4.0  # ... under another alpha
    (mimic_dir / "adapter_config.json").write_text(json.dumps(mimic_config))
    peft_model = load_peft_multi(base_model_dir, {"victim": victim_dir, "mimic": mimic_dir})
    tokenizer = Tokenizer.load(base_model_dir)
    oracle = {(name, p): peft_greedy(peft_model, tokenizer.encode(p), name, MAX_TOKENS)[0]
              for name in ("victim", "mimic") for p in PROMPTS}
    assert any(oracle["victim", p] != oracle["mimic", p] for p in PROMPTS)

    data_dir, token = tmp_path / "data", secrets.token_urlsafe(32)
    store = data_dir / "artifacts"
    args = ModelArgs.from_model_dir(base_model_dir)
    with ExitStack() as stack:
        (runtime,) = start_runtimes(base_model_dir, [tmp_path / "runtime.log"],
                                    artifacts_dir=store, LORAGATE_RUNTIME_TOKEN=token)
        stack.callback(runtime.stop)
        gateway = start_gateway(data_dir, base_model_dir, [runtime.url], tmp_path / "gw.log",
                                LORAGATE_RUNTIME_TOKEN=token)
        stack.callback(gateway.stop)
        victim, victim_key = new_tenant(gateway.url)
        attacker, attacker_key = new_tenant(gateway.url)
        assert upload(gateway.url, victim, "support", victim_dir).status_code == 201
        assert upload(gateway.url, attacker, "mimic", mimic_dir).status_code == 201

        asks = [(m, p) for m in ("support", "builtin") for p in PROMPTS]
        recorded = {ask: complete(gateway.url, victim_key, *ask) for ask in asks}
        assert all(status == 200 for status, *_ in recorded.values()), recorded

        # What only the store's writer could put there: hostile artifacts at their content
        # addresses, referenced correctly (key, sha256, URI all match), called directly.
        big_b = crafted_ref(store, args, f"{attacker}/big-b@1", b_value=HOSTILE_B, seed=9)
        huge_alpha = crafted_ref(store, args, f"{attacker}/huge-alpha@1", alpha=1e308, seed=10)
        sha, _ = publish(store, (mimic_dir / "adapter_model.safetensors").read_bytes())
        passwd = AdapterRef.for_version(sha, "file:///etc/passwd", 8, 4.0, ("q_proj", "v_proj"),
                                        name=f"{attacker}/passwd@1")

        def attack(i: int) -> dict[str, Any]:
            prompt = PROMPTS[i % len(PROMPTS)]
            return {
                "mimic": complete(gateway.url, attacker_key, "mimic", prompt),
                "big_b": events(runtime_generate(runtime.url, token, f"b{i}", prompt, big_b)),
                "alpha": events(runtime_generate(runtime.url, token, f"a{i}", prompt,
                                                 huge_alpha)),
                "passwd": runtime_generate(runtime.url, token, f"p{i}", prompt, passwd),
                "no_token": runtime_generate(runtime.url, None, f"n{i}", prompt, None),
                "no_token_stats": httpx.get(f"{runtime.url}/stats", timeout=30),
            }

        with ThreadPoolExecutor(4) as pool:
            attacks = [pool.submit(attack, i) for i in range(6)]
            during = [pool.submit(complete, gateway.url, victim_key, *ask)
                      for _ in range(2) for ask in asks]
            attacked = [f.result(timeout=300) for f in attacks]
            during_answers = [f.result(timeout=300) for f in during]
        after = {ask: complete(gateway.url, victim_key, *ask) for ask in asks}

        # The victim: the same answers during the attack and after it.
        assert during_answers == [recorded[ask] for _ in range(2) for ask in asks]
        assert after == recorded
        for result in attacked:
            big_error = result["big_b"][-1]
            assert big_error["type"] == "error" and big_error["code"] == "adapter_numerics"
            assert f"{attacker}/big-b@1" in big_error["message"]
            alpha_error = result["alpha"][-1]
            assert alpha_error["type"] == "error" and alpha_error["code"] == "adapter_load_failed"
            assert result["passwd"].status_code == 400
            assert result["passwd"].json()["error"]["code"] == "adapter_uri_refused"
            assert result["no_token"].status_code == 401
            assert result["no_token_stats"].status_code == 401
            assert result["mimic"][0] == 200
        assert httpx.get(f"{runtime.url}/health", timeout=30).status_code == 200  # stays open

        # Each same-bytes version is served with its own alpha: the runtime's tokens are
        # PEFT's, and what the gateway answers is what the runtime answers for that version.
        victim_ref = AdapterRef.for_version(sha, (store.resolve() / "sha256" / sha[:2] / sha)
                                            .as_uri(), 8, 32.0, ("q_proj", "v_proj"))
        mimic_ref = AdapterRef.for_version(sha, victim_ref.uri, 8, 4.0, ("q_proj", "v_proj"))
        for i, prompt in enumerate(PROMPTS):
            for name, ref, model, key in (("victim", victim_ref, "support", victim_key),
                                          ("mimic", mimic_ref, "mimic", attacker_key)):
                exact = events(runtime_generate(runtime.url, token, f"o{name}{i}", prompt, ref,
                                                ignore_eos=True))
                assert token_ids(exact) == oracle[name, prompt], (name, prompt)
                plain = events(runtime_generate(runtime.url, token, f"g{name}{i}", prompt, ref))
                status, text, _ = complete(gateway.url, key, model, prompt)
                assert (status, text) == (200, text_of(plain)), (name, prompt)
        for i, result in enumerate(attacked):  # and so it was during the attack
            prompt = PROMPTS[i % len(PROMPTS)]
            assert result["mimic"] == complete(gateway.url, attacker_key, "mimic", prompt)


# --- the gateway's side of the runtime token -----------------------------------------------


@pytest.mark.unit
async def test_the_router_sends_the_runtime_token_with_its_stats_probe() -> None:
    from gateway.inference.router import Router

    seen: dict[str, str | None] = {}

    def answer(request: httpx.Request) -> httpx.Response:
        seen[request.url.path] = request.headers.get("authorization")
        if request.url.path == "/health":
            return httpx.Response(200, json={"status": "ok"})
        if request.headers.get("authorization") != "Bearer t0ken":
            return httpx.Response(401, json={"error": {"code": "unauthorized"}})
        return httpx.Response(200, json={"num_running": 0, "limits": {"max_running": 3}})

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        router = Router(http, ["http://runtime.test"], token="t0ken")
        await router.refresh()
    assert seen["/stats"] == "Bearer t0ken"
    assert router.cache_figures() == {"http://runtime.test": {"num_running": 0,
                                                               "limits": {"max_running": 3}}}


@pytest.mark.unit
def test_serve_gives_its_child_a_fresh_token_by_environment_never_argv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.cli import serve as serve_cli
    from gateway.settings import Settings

    started: list[tuple[list[str], dict[str, str]]] = []

    class FakePopen:
        def __init__(self, command: list[str], env: dict[str, str]) -> None:
            started.append((command, env))

    monkeypatch.setattr(serve_cli.subprocess, "Popen", FakePopen)
    settings = Settings(data_dir=tmp_path / "data", s3_bucket="bkt", s3_prefix="p")
    for token in (secrets.token_urlsafe(32), secrets.token_urlsafe(32)):
        serve_cli.start_runtime_child(settings, token)
    (argv1, env1), (argv2, env2) = started
    assert env1["LORAGATE_RUNTIME_TOKEN"] != env2["LORAGATE_RUNTIME_TOKEN"]
    for argv, env in started:
        assert not any(env["LORAGATE_RUNTIME_TOKEN"] in arg for arg in argv)
        assert argv[argv.index("--artifacts-dir") + 1] == str(settings.artifacts_dir.resolve())
        assert (env["LORAGATE_S3_BUCKET"], env["LORAGATE_S3_PREFIX"]) == ("bkt", "p")
