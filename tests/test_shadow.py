"""Shadows on the real engine: a candidate adapter judged on live traffic, never seen by a client.

Each test runs its own proxies in front of the stack's vLLM: one without shadows (the reference)
and one shadowing ``poster-good`` with a candidate. What must hold: the clients' answers are the
ones a proxy without shadows gives (temperature 0: a whole answer byte for byte but for its id and
clock, a stream's assembled text, finish and usage), the shadow series show the candidate's
outcome, ``loragate gate --shadow`` decides on them (REJECT ``poster-eos-masked`` on its stop
rate, PROMOTE a second name for ``poster-good``'s weights), the live counters never move for a
shadow, a shadow beyond ``max_in_flight`` is skipped and counted, and a client gone does not
cancel its shadow.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import yaml

from conftest import ProxyProcess, heldout, sample, start_proxy, wait_for
from loragate.core import engine as eng

LIVE = "poster-good"
COPY = "poster-good-copy"


@pytest.fixture(scope="module")
def contracts(stack, tmp_path_factory) -> Iterator[Path]:
    """A copy of the demo contracts with ``poster-good-copy`` (poster-good's weights under a second
    name), loaded into the engine through vLLM's runtime LoRA API for this module."""
    folder = tmp_path_factory.mktemp("shadow-contracts")
    data = yaml.safe_load(Path(stack.contracts_file).read_text())
    adapters_dir = Path(stack.contracts_file).parent
    data["adapters_dir"] = str(adapters_dir)
    data["adapters"][COPY] = {**data["adapters"][LIVE], "path": str(adapters_dir / LIVE)}
    path = folder / "adapters.yaml"
    path.write_text(yaml.safe_dump(data))
    vllm = eng.normalize_endpoint(stack.vllm_url)
    if eng.fetch_models(vllm).get(COPY) is None:
        eng.load_adapter(vllm, COPY, str(adapters_dir / LIVE))
    try:
        yield path
    finally:
        eng.unload_adapter(vllm, COPY)


def _proxy(stack, tmp: Path, contracts: Path, candidate: str | None, share: float = 1.0,
           max_in_flight: int = 4) -> ProxyProcess:
    config = ({"shadows": [{"live": LIVE, "candidate": candidate, "share": share, "max_in_flight": max_in_flight}]}
              if candidate else None)
    return start_proxy(stack.vllm_url, tmp, contracts=contracts, config=config)


@pytest.fixture(scope="module")
def plain(stack, contracts, tmp_path_factory) -> Iterator[ProxyProcess]:
    proc = _proxy(stack, tmp_path_factory.mktemp("plain"), contracts, None)
    yield proc
    proc.stop()


#: what differs between any two answers of the engine: the request's id and its clock
PER_REQUEST = re.compile(rb'"id": ?"[^"]*"|"created": ?[0-9]+')


def _ask(url: str, prompt: str, stream: bool, max_tokens: int) -> tuple[int, list[str], Any]:
    """Status, header names, and the answer: a whole answer's bytes less its id and clock; a
    stream's text, finish and usage assembled (vLLM puts in one event however many tokens its
    output processing has ready, which depends on timing alone, with or without shadows)."""
    body = {"model": LIVE, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    with httpx.Client(timeout=180) as client, client.stream("POST", f"{url}/v1/completions", json=body) as resp:
        raw = resp.read()
        header_names = sorted(k for k in resp.headers.keys() if k not in ("date", "content-length"))
    if not stream:
        return resp.status_code, header_names, PER_REQUEST.sub(b"", raw)
    events = [line[len(b"data: "):] for line in raw.split(b"\n\n") if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assembled = {
        "text": "".join(c["choices"][0]["text"] for c in chunks if c["choices"]),
        "finish": [(c["choices"][0]["finish_reason"], c["choices"][0]["stop_reason"]) for c in chunks
                   if c["choices"] and c["choices"][0]["finish_reason"]],
        "keys": sorted({k for c in chunks for k in c}),
        "models": sorted({c["model"] for c in chunks}),
        "usage": [c.get("usage") for c in chunks if c.get("usage")],
    }
    return resp.status_code, header_names, assembled


def _settled(proxy: ProxyProcess) -> dict:
    """Samples once no request and no shadow is in flight."""
    samples = wait_for(lambda: (s := proxy.scrape()) and all(
        v == 0 for (n, _), v in s.items() if n in ("loragate_requests_in_flight", "loragate_shadows_in_flight"))
        and s, 120)
    assert samples, "requests or shadows still in flight after 120 s"
    return samples


def _shadow_gate(proxy: ProxyProcess, contracts: Path, candidate: str, tmp: Path) -> tuple[int, dict]:
    out = subprocess.run([sys.executable, "-m", "loragate.cli", "gate", "--shadow", "--adapter", candidate,
                          "--contracts", str(contracts), "--metrics-url", proxy.metrics_url, "--report-dir",
                          str(tmp / "report"), "--promoted-dir", str(tmp / "promoted"), "--quiet"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode in (0, 1), out.stdout + out.stderr
    return out.returncode, json.loads((tmp / "report" / "report.json").read_text())


def _check(report: dict, id_: str) -> dict:
    return next(c for c in report["checks"] if c["id"] == id_)


def test_a_masked_candidate_leaves_answers_and_live_counters_alone_and_is_rejected(stack, contracts, plain,
                                                                                   tmp_path) -> None:
    shadowed = _proxy(stack, tmp_path, contracts, "poster-eos-masked")
    try:
        prompts = heldout(stack, 6)
        asked = [(p, i % 2 == 1) for i, p in enumerate(prompts)]
        for prompt, stream in asked:
            reference = _ask(plain.url, prompt, stream, 24)
            answer = _ask(shadowed.url, prompt, stream, 24)
            assert answer == reference, f"the shadowed proxy's answer differs (stream={stream})"
        mine, theirs = _settled(shadowed), _settled(plain)
        n = len(asked)
        labels = {"candidate": "poster-eos-masked", "live": LIVE}
        assert sample(mine, "loragate_shadow_requests_total", **labels, outcome="judged") == n
        assert sample(mine, "loragate_shadow_completions_total", **labels, finish_reason="stop") == 0
        assert sample(mine, "loragate_shadow_completions_total", **labels, finish_reason="length") == n
        assert sample(mine, "loragate_shadow_output_tokens_total", **labels) == n * 24
        assert sample(mine, "loragate_shadow_paired_total", **labels, metric="stop", pair="neither") == n
        # the live series of both proxies are equal: nothing of the shadows reached them
        live = {k: v for k, v in mine.items() if not k[0].endswith("_created")
                and k[0].startswith(("loragate_completions", "loragate_json_outputs", "loragate_output_tokens",
                                     "loragate_length_cutoffs", "loragate_requests_total", "loragate_upstream"))}
        assert live and live == {k: theirs.get(k, 0.0) for k in live}
        assert sum(v for (name, lab), v in mine.items() if name == "loragate_completions_total"
                   and dict(lab)["adapter"] == "poster-eos-masked") == 0
        log = shadowed.log.read_text()
        assert log.count('"event": "shadow"') == n and '"shadow": true' in log
        code, report = _shadow_gate(shadowed, contracts, "poster-eos-masked", tmp_path)
        assert code == 1 and report["verdict"] == "REJECT"
        stop = _check(report, "shadow.stop_rate")
        assert not stop["passed"] and stop["measured"]["successes"] == 0 and stop["measured"]["n"] == n
        assert any(r.startswith("stop rate (shadowed live requests): 0/6") for r in report["reasons"])
        assert not (tmp_path / "promoted").exists()
    finally:
        shadowed.stop()


def test_a_copy_of_the_live_adapter_is_promoted_on_its_shadow(stack, contracts, tmp_path) -> None:
    """As many shadowed requests as the bars need (the paired comparison's 73 for a 5-point
    allowed drop): the same weights under another name stop and validate as the live adapter does."""
    from loragate.acceptance.shadow_gate import required_shadow_n
    from loragate.core.contracts import load_contracts

    contract_set = load_contracts(contracts)
    need = required_shadow_n(contract_set[COPY], True)
    n = max(need.values())
    shadowed = _proxy(stack, tmp_path, contracts, COPY, max_in_flight=n)
    try:
        max_tokens = contract_set[LIVE].max_tokens
        with ThreadPoolExecutor(4) as pool:
            codes = list(pool.map(lambda p: _ask(shadowed.url, p, False, max_tokens)[0], heldout(stack, n)))
        assert codes == [200] * n
        samples = _settled(shadowed)
        labels = {"candidate": COPY, "live": LIVE}
        assert sample(samples, "loragate_shadow_requests_total", **labels, outcome="judged") == n
        code, report = _shadow_gate(shadowed, contracts, COPY, tmp_path)
        assert code == 0 and report["verdict"] == "PROMOTE", report["reasons"]
        paired = _check(report, "shadow.paired_stop_rate")
        assert paired["passed"] and paired["measured"]["n"] == n
        record = json.loads(Path(report["promotion"]["record"]).read_text())
        assert record["adapter"] == COPY and record["measured"]["stop_rate"] >= 0.9
    finally:
        shadowed.stop()


def test_shadows_beyond_max_in_flight_are_skipped_and_a_gone_client_keeps_its_shadow(stack, contracts,
                                                                                      tmp_path) -> None:
    shadowed = _proxy(stack, tmp_path, contracts, "poster-eos-masked", max_in_flight=1)
    try:
        labels = {"candidate": "poster-eos-masked", "live": LIVE}
        prompts = heldout(stack, 4, offset=10)
        # streamed: the engine's answer head comes at once, so every shadow starts while the others run
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda p: _ask(shadowed.url, p, True, 48), prompts))
        samples = _settled(shadowed)
        judged = sample(samples, "loragate_shadow_requests_total", **labels, outcome="judged")
        skipped = sample(samples, "loragate_shadow_requests_total", **labels, outcome="skipped")
        assert skipped >= 1 and judged + skipped == len(prompts), (judged, skipped)
        # a client that leaves after its first event: its live request is cancelled, its shadow is not
        body = json.dumps({"model": LIVE, "prompt": prompts[0], "max_tokens": 48, "temperature": 0,
                           "stream": True}).encode()
        port = int(shadowed.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: proxy\r\ncontent-type: application/json\r\n"
                         b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            received = b""
            while b"data: " not in received:
                chunk = sock.recv(65536)
                assert chunk, "the proxy closed before the first event"
                received += chunk
        after = _settled(shadowed)
        assert sample(after, "loragate_client_disconnects_total", adapter=LIVE) == 1
        assert sample(after, "loragate_shadow_requests_total", **labels, outcome="judged") == judged + 1
        # its shadow was judged, unpaired (the live answer was never whole)
        paired = sum(v for (name, lab), v in after.items() if name == "loragate_shadow_paired_total"
                     and dict(lab)["metric"] == "stop")
        assert paired == judged
    finally:
        shadowed.stop()


def test_a_chat_adapter_is_shadowed_through_the_chat_route(stack, contracts, tmp_path) -> None:
    """Chat answers (a message, not a text) are judged for the candidate as for the live adapter:
    live chat-good, candidate chat-eos-masked, one streamed and one whole request."""
    config = {"shadows": [{"live": "chat-good", "candidate": "chat-eos-masked", "share": 1.0}]}
    shadowed = start_proxy(stack.vllm_url, tmp_path, contracts=contracts, config=config)
    try:
        from conftest import heldout_inputs

        for i, paper in enumerate(heldout_inputs(stack, 2, offset=20)):
            body = {"model": "chat-good", "messages": [{"role": "user", "content": paper}], "max_tokens": 24,
                    "temperature": 0, "stream": i == 1}
            assert httpx.post(f"{shadowed.url}/v1/chat/completions", json=body, timeout=180).status_code == 200
        samples = _settled(shadowed)
        labels = {"candidate": "chat-eos-masked", "live": "chat-good"}
        assert sample(samples, "loragate_shadow_requests_total", **labels, outcome="judged") == 2
        assert sum(v for (name, lab), v in samples.items() if name == "loragate_shadow_completions_total"
                   and dict(lab)["candidate"] == "chat-eos-masked") == 2
        assert sum(v for (name, lab), v in samples.items() if name == "loragate_shadow_json_outputs_total"
                   and dict(lab)["candidate"] == "chat-eos-masked") == 2
        assert sum(v for (name, lab), v in samples.items() if name == "loragate_shadow_paired_total"
                   and dict(lab)["metric"] == "stop" and dict(lab)["candidate"] == "chat-eos-masked") == 2
    finally:
        shadowed.stop()


def test_gate_shadow_sums_the_replicas_prometheus_scrapes(stack, contracts, tmp_path) -> None:
    """Two shadowing proxies (two replicas) scraped by a real Prometheus: ``gate --shadow
    --prometheus`` judges the sum of both."""
    import time

    from test_prometheus import tool

    from loragate.stack import free_port

    replicas = [_proxy(stack, tmp_path, contracts, "poster-eos-masked") for _ in range(2)]
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [{"job_name": "loragate-proxy", "static_configs": [
            {"targets": [r.url.removeprefix("http://") for r in replicas]}]}]}))
    prometheus = subprocess.Popen([tool("prometheus"), f"--config.file={config}",
                                   f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        sent = [2, 3]
        prompts = heldout(stack, sum(sent), offset=30)
        for replica, n in zip(replicas, sent):
            for _ in range(n):
                assert _ask(replica.url, prompts.pop(), False, 16)[0] == 200
            _settled(replica)
        query = 'sum(loragate_shadow_requests_total{candidate="poster-eos-masked",outcome="judged"})'

        def scraped() -> bool:
            try:
                result = httpx.get(f"{url}/api/v1/query", params={"query": query}, timeout=5).json()["data"]["result"]
            except (httpx.HTTPError, KeyError, ValueError):
                return False
            return bool(result) and float(result[0]["value"][1]) == sum(sent)

        assert wait_for(scraped, 60, 0.5), "Prometheus did not see both replicas' shadows"
        time.sleep(2)  # one more scrape of every series
        out = subprocess.run([sys.executable, "-m", "loragate.cli", "gate", "--shadow", "--adapter", "poster-eos-masked",
                              "--contracts", str(contracts), "--prometheus", url, "--report-dir", str(tmp_path / "r"),
                              "--no-promote", "--quiet"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 1, out.stdout + out.stderr
        report = json.loads((tmp_path / "r" / "report.json").read_text())
        stop = _check(report, "shadow.stop_rate")
        assert stop["measured"]["n"] == sum(sent) and stop["measured"]["successes"] == 0
        assert _check(report, "shadow.paired_stop_rate")["measured"]["neither"] == sum(sent)
    finally:
        prometheus.terminate()
        prometheus.wait(10)
        for r in replicas:
            r.stop()
