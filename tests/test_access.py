"""Access control at the proxy, against the real vLLM of the stack.

- API keys: every engine path needs one when keys are configured (401 without, with a wrong one,
  with a prefix of a right one); each configured key works; keys never appear in the logs.
- ``/health`` and ``/ready`` never need a key; ``/metrics`` only where ``public_metrics`` is on.
- The engine's adapter endpoints (``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``, the
  SageMaker-style ``/adapters``) are refused without the admin key (a spelling with dot or
  empty segments is refused as a target first, tests/test_hardening.py has every spelling);
  with it, a real load and unload work.
- Adapter folders in load requests, and in the contracts, cannot leave the adapters directory
  (absolute paths, ``..``, a symbolic link pointing out).

The proxies here read a copy of the demo contracts in a temporary adapters directory holding a
copy of ``poster-good``, so a real runtime load can be tried without touching the demo build.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import yaml
from conftest import ProxyProcess, start_proxy

from loragate.core.contracts import load_contracts
from loragate.core.errors import LoragateError

pytestmark = pytest.mark.stack

KEYS = (f"client-{secrets.token_hex(12)}", f"client-{secrets.token_hex(12)}")
ADMIN = f"admin-{secrets.token_hex(12)}"
WRONG = f"client-{secrets.token_hex(12)}"
#: Name the runtime-loaded copy of poster-good is served under (unloaded again by the test).
COPY_NAME = f"access-copy-{os.getpid()}"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def adapters_dir(stack, tmp_path_factory) -> Path:
    """A temporary adapters directory: the demo contracts, a copy of poster-good, and a
    symbolic link inside it that points outside it."""
    root = tmp_path_factory.mktemp("adapters")
    demo = load_contracts(stack.contracts_file)
    shutil.copytree(demo["poster-good"].path, root / "poster-good-copy")
    doc = yaml.safe_load(Path(stack.contracts_file).read_text())
    doc["adapters"] = {"poster-good": {**doc["adapters"]["poster-good"], "path": "poster-good-copy"}}
    (root / "adapters.yaml").write_text(yaml.safe_dump(doc))
    (root / "link-out").symlink_to(demo["poster-good"].path)  # a real adapter, but outside root
    return root


@pytest.fixture(scope="module")
def guarded(stack, adapters_dir, tmp_path_factory) -> Iterator[ProxyProcess]:
    proxy = start_proxy(stack.vllm_url, tmp_path_factory.mktemp("guarded"), contracts=adapters_dir / "adapters.yaml",
                        env={"LORAGATE_PROXY_API_KEYS": ",".join(KEYS), "LORAGATE_PROXY_ADMIN_KEY": ADMIN,
                             "LORAGATE_PROXY_PUBLIC_METRICS": "false"})
    try:
        yield proxy
    finally:
        proxy.stop()


def test_api_keys_are_required_on_every_engine_path(guarded):
    url = guarded.url
    body = {"model": "poster-good", "prompt": "x", "max_tokens": 2}
    for headers in ({}, bearer(WRONG), bearer(KEYS[0][:-1]), bearer(KEYS[0] + "x"), {"Authorization": KEYS[0]},
                    {"Authorization": f"Basic {KEYS[0]}"}, {"Authorization": "Bearer"}):
        resp = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=30)
        assert resp.status_code == 401, headers
        assert resp.json()["error"]["type"] == "authentication_error"
    # not only /v1/: vLLM generates on /invocations and tokenizes on /tokenize
    for path in ("/invocations", "/tokenize", "/version"):
        resp = httpx.post(f"{url}{path}", json=body, timeout=30) if path != "/version" else httpx.get(f"{url}{path}")
        assert resp.status_code == 401, path
    # spellings some server would route differently are refused before any key is looked at
    with httpx.Client(timeout=30) as client:
        for path in ("//v1/completions",):
            request = client.build_request("POST", url, json=body)
            request.url = request.url.copy_with(raw_path=path.encode())
            assert client.send(request).status_code == 400, path
    assert httpx.get(f"{url}/v1/models").status_code == 401
    for key in KEYS:
        resp = httpx.post(f"{url}/v1/completions", json=body, headers=bearer(key), timeout=60)
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["text"] is not None
    assert httpx.post(f"{url}/invocations", json=body, headers=bearer(KEYS[1]), timeout=60).status_code == 200
    assert httpx.get(f"{url}/v1/models", headers={"authorization": f"bearer {KEYS[0]}"}).status_code == 200


def test_health_needs_no_key_and_metrics_only_where_configured(stack, guarded, tmp_path):
    assert httpx.get(f"{guarded.url}/health").status_code == 200
    assert httpx.get(f"{guarded.url}/ready").status_code == 200
    refused = httpx.get(guarded.metrics_url)
    assert refused.status_code == 401 and "loragate_" not in refused.text
    assert httpx.get(guarded.metrics_url, headers=bearer(WRONG)).status_code == 401
    assert "loragate_requests_total" in httpx.get(guarded.metrics_url, headers=bearer(KEYS[1])).text
    public = start_proxy(stack.vllm_url, tmp_path, contracts=stack.contracts_file,
                         env={"LORAGATE_PROXY_API_KEYS": KEYS[0]})  # public_metrics defaults to true
    try:
        assert httpx.get(public.metrics_url).status_code == 200
        assert httpx.post(f"{public.url}/v1/completions", json={"model": "poster-good", "prompt": "x"}).status_code == 401
    finally:
        public.stop()


def served(stack) -> set[str]:
    return {m["id"] for m in httpx.get(f"{stack.vllm_url}/v1/models", timeout=10).json()["data"]}


def test_adapter_endpoints_need_the_admin_key(stack, guarded):
    url = guarded.url
    load = {"lora_name": COPY_NAME, "lora_path": "poster-good-copy"}
    attempts = [
        ("POST", "/v1/load_lora_adapter", load, {}),
        ("POST", "/v1/load_lora_adapter", load, bearer(KEYS[0])),  # a client key is not the admin key
        ("POST", "/v1/load_lora_adapter", load, bearer(WRONG)),
        ("POST", "/v1/./load_lora_adapter", load, bearer(KEYS[0])),
        ("POST", "//v1/load_lora_adapter", load, bearer(KEYS[0])),
        ("POST", "/v1/x/../load_lora_adapter", load, bearer(KEYS[0])),
        ("POST", "/v1/unload_lora_adapter", {"lora_name": "poster-good"}, bearer(KEYS[0])),
        ("POST", "/adapters", {"name": COPY_NAME, "src": "poster-good-copy"}, bearer(KEYS[0])),
        ("DELETE", "/adapters/poster-good", None, bearer(KEYS[0])),
    ]
    with httpx.Client(timeout=30) as client:
        for method, path, body, headers in attempts:
            # raw paths (httpx still normalises dot segments; tests/test_hardening.py sends raw bytes)
            request = client.build_request(method, url, json=body, headers=headers)
            request.url = request.url.copy_with(raw_path=path.encode())
            resp = client.send(request)
            if "/." in path or "//" in path:  # refused as a target (or normalised by httpx: then 403)
                assert resp.status_code in (400, 403), (method, path, resp.text)
                continue
            assert resp.status_code == 403, (method, path, resp.text)
            assert resp.json()["error"]["type"] == "permission_error"
    assert COPY_NAME not in served(stack) and "poster-good" in served(stack)


def test_admin_key_loads_and_unloads_a_copy_inside_the_adapters_dir(stack, guarded, adapters_dir):
    url = guarded.url
    admin = bearer(ADMIN)
    resp = httpx.post(f"{url}/v1/load_lora_adapter", headers=admin, timeout=120,
                      json={"lora_name": COPY_NAME, "lora_path": "poster-good-copy"})
    try:
        assert resp.status_code == 200, resp.text
        assert COPY_NAME in served(stack)
        answer = httpx.post(f"{url}/v1/completions", headers=bearer(KEYS[0]), timeout=120,
                            json={"model": COPY_NAME, "prompt": "### Paper:\nA short paper.\n### Layout:\n",
                                  "max_tokens": 8, "temperature": 0})
        assert answer.status_code == 200 and answer.json()["model"] == COPY_NAME
    finally:
        gone = httpx.post(f"{url}/v1/unload_lora_adapter", headers=admin, json={"lora_name": COPY_NAME}, timeout=60)
    assert gone.status_code == 200, gone.text
    assert COPY_NAME not in served(stack)


@pytest.mark.parametrize("folder", [
    "/etc", "../", "../../../../etc", "poster-good-copy/../../", "link-out", "link-out/", "/", "",
    "poster-good-copy/\x00x",
])
def test_load_paths_cannot_leave_the_adapters_dir(stack, guarded, adapters_dir, folder):
    for path, field in (("/v1/load_lora_adapter", "lora_path"), ("/adapters", "src")):
        body = {"lora_name": COPY_NAME, "name": COPY_NAME, field: folder}
        resp = httpx.post(f"{guarded.url}{path}", headers=bearer(ADMIN), json=body, timeout=30)
        assert resp.status_code in (400, 403), (path, folder, resp.text)
        assert resp.json()["error"]["type"] in ("permission_error", "invalid_request_error")
    assert COPY_NAME not in served(stack)


def test_absolute_load_path_inside_the_dir_is_accepted_and_the_resolved_path_forwarded(stack, guarded, adapters_dir):
    """The check does not just refuse everything: an absolute path inside passes (and unloads)."""
    resp = httpx.post(f"{guarded.url}/v1/load_lora_adapter", headers=bearer(ADMIN), timeout=120,
                      json={"lora_name": COPY_NAME, "lora_path": str(adapters_dir / "x" / ".." / "poster-good-copy")})
    try:
        assert resp.status_code == 200, resp.text
    finally:
        httpx.post(f"{guarded.url}/v1/unload_lora_adapter", headers=bearer(ADMIN), json={"lora_name": COPY_NAME},
                   timeout=60)
    assert COPY_NAME not in served(stack)


def test_loads_are_refused_when_the_proxy_has_no_adapters_dir(stack, tmp_path):
    proxy = start_proxy(stack.vllm_url, tmp_path, env={"LORAGATE_PROXY_ADMIN_KEY": ADMIN})
    try:
        resp = httpx.post(f"{proxy.url}/v1/load_lora_adapter", headers=bearer(ADMIN), timeout=30,
                          json={"lora_name": COPY_NAME, "lora_path": str(load_contracts(stack.contracts_file)["poster-good"].path)})
        assert resp.status_code == 403 and "no contracts" in resp.json()["error"]["message"]
    finally:
        proxy.stop()


def test_contract_paths_cannot_leave_the_adapters_dir(adapters_dir, tmp_path):
    doc = yaml.safe_load((adapters_dir / "adapters.yaml").read_text())
    for folder in ("link-out", "../outside", "/etc"):
        doc["adapters"]["poster-good"]["path"] = folder
        target = adapters_dir / f"escape-{abs(hash(folder))}.yaml"
        target.write_text(yaml.safe_dump(doc))
        with pytest.raises(LoragateError, match="escapes"):
            load_contracts(target)
        target.unlink()


def test_keys_never_reach_the_logs(guarded):
    """After every test above used them (this runs last in the module), no key is in the log."""
    httpx.post(f"{guarded.url}/v1/completions", headers=bearer(WRONG), json={"model": "x", "prompt": "x"})
    text = guarded.log.read_text()
    assert '"event": "start"' in text and '"auth": true' in text  # the log is the proxy's, and it logs
    for key in (*KEYS, ADMIN, WRONG):
        assert key not in text
        assert key[7:] not in text  # nor the random part alone


def test_keys_are_compared_in_constant_time_every_one(monkeypatch):
    """Each presented key is compared with every configured key through hmac.compare_digest
    (no ``==``, no early exit on the first match), as SHA-256 digests of equal length, so timing
    tells neither which key matched nor how long the keys are."""
    import hashlib
    import hmac

    from loragate.server import app as proxy_app
    from loragate.server.config import load_config

    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(proxy_app.hmac, "compare_digest", counting)
    app = proxy_app.ProxyApp(load_config(env={}, upstream="http://127.0.0.1:9", api_keys=",".join(KEYS)))
    for presented, ok in ((KEYS[0], True), (KEYS[1], True), (WRONG, False)):
        calls.clear()
        scope = {"headers": [(b"authorization", f"Bearer {presented}".encode())]}
        assert app._authorised(scope, app._api_keys) is ok
        assert [b for _, b in calls] == [hashlib.sha256(k.encode()).digest() for k in KEYS]
        assert all(a == hashlib.sha256(presented.encode()).digest() and len(a) == len(b) == 32 for a, b in calls)
