"""``loragate rollout status``: wait until every replica serves a promoted set.

Which replicas: ``--replica URL`` (a proxy's base URL, repeatable), or the engine pods of a
Helm release (``--release NAME [--namespace NS]``), listed with the ``kubernetes`` client
(kubeconfig, or the pod's service account in a cluster) and asked through the API server's pod
proxy, as ``kubectl`` would reach them. The pods are listed again on every poll: a rollout's
new pods count, terminating ones do not.

Which revision: ``--revision R``, or that of a promoted-set file (``--promoted-file``: the
chart's ``promoted.json``, or ``.loragate/promoted/promoted-set.json`` the gate writes), or, with
``--release``, that of the release's promoted-set ConfigMap.

Exit status: 0 when every replica applied the revision with every adapter loaded; 1 when the
time ran out, or every replica applied it but some adapter failed, conflicts or is invalid
(each is named per replica); 2 when the command cannot run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

from loragate.core import settings
from loragate.core.errors import LoragateError
from loragate.core.promoted_set import FILE_NAME, revision
from loragate.core.rollout import ReplicaStatus, fetch, parse_report, wait

#: Labels of the chart's engine pods and of its promoted-set ConfigMap (charts/loragate/templates).
ENGINE_SELECTOR = "app.kubernetes.io/instance={release},app.kubernetes.io/component=engine"
PROMOTED_SELECTOR = "app.kubernetes.io/instance={release},loragate.dev/promoted-set=true"


def configure(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("action", choices=["status"], help="status: wait until every replica applied the set")
    parser.add_argument("--replica", action="append", default=[], metavar="URL",
                        help="a replica's proxy base URL, e.g. http://10.0.0.7:8000 (repeatable)")
    parser.add_argument("--release", help="the Helm release whose engine pods are the replicas (kubernetes client)")
    parser.add_argument("--namespace", help="the release's namespace (default: the kubeconfig context's, or default)")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, or in-cluster)")
    parser.add_argument("--context", help="kubeconfig context")
    parser.add_argument("--port", type=int, default=settings.PROXY_PORT,
                        help="the proxy's port in the pods (default %(default)s)")
    parser.add_argument("--revision", help="the promoted-set revision to wait for")
    parser.add_argument("--promoted-file", type=Path, help=f"a promoted-set file ({FILE_NAME}): wait for its revision")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait (default %(default)s)")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between polls (default %(default)s)")
    parser.add_argument("--api-key", help="client key, when the proxies' /promoted needs one (default: $LORAGATE_API_KEY)")


def run(args: argparse.Namespace) -> int:
    if bool(args.replica) == bool(args.release):
        raise LoragateError("give either --replica URL (one or more) or --release NAME")
    api_key = args.api_key or os.environ.get("LORAGATE_API_KEY")
    replicas: Callable[[], Iterable[ReplicaStatus]]
    want: str | None
    if args.release:
        cluster = _Cluster(args.release, args.namespace, args.kubeconfig, args.context, args.port)
        replicas = cluster.statuses
        want = _wanted(args) or cluster.revision()
    else:
        urls = list(args.replica)
        replicas = lambda: [fetch(url, api_key) for url in urls]  # noqa: E731
        want = _wanted(args)
    if want is None:
        raise LoragateError("give the revision to wait for: --revision R or --promoted-file FILE")
    wanted: str = want

    last: list[str] = []

    def progress(statuses: list[ReplicaStatus]) -> None:
        lines = [s.describe(wanted) for s in statuses]
        if lines != last:
            last[:] = lines
            for line in lines:
                print(f"  {line}", file=sys.stderr, flush=True)

    print(f"waiting for promoted-set revision {wanted} on every replica", file=sys.stderr, flush=True)
    result = wait(replicas, wanted, timeout_s=args.timeout, interval_s=args.interval, progress=progress)
    for status in result.replicas:
        print(status.describe(wanted))
    if result.ok:
        print(f"rollout of {wanted}: done on {len(result.replicas)} replicas in {result.seconds:.0f} s")
        return 0
    if result.done:
        print(f"rollout of {wanted}: applied on every replica, but adapters failed (named above)")
    elif not result.replicas:
        print(f"rollout of {wanted}: no replica found within {args.timeout:.0f} s")
    else:
        print(f"rollout of {wanted}: not applied everywhere within {args.timeout:.0f} s")
    return 1


def _wanted(args: argparse.Namespace) -> str | None:
    if args.revision and args.promoted_file:
        raise LoragateError("give --revision or --promoted-file, not both")
    if args.promoted_file:
        try:
            return revision(args.promoted_file.read_bytes())
        except OSError as exc:
            raise LoragateError(f"cannot read {args.promoted_file}: {exc.strerror}") from None
    return args.revision


def engine_pods(pods: Iterable[Any]) -> list[str]:
    """Names of the pods that are replicas now: scheduled and not terminating."""
    return sorted(p.metadata.name for p in pods
                  if p.metadata.deletion_timestamp is None and p.status is not None
                  and p.status.phase in ("Pending", "Running"))


class _Cluster:
    """The release's engine pods and promoted-set ConfigMap, through the kubernetes client."""

    def __init__(self, release: str, namespace: str | None, kubeconfig: str | None, context: str | None,
                 port: int) -> None:
        try:
            from kubernetes import client, config
        except ImportError:
            raise LoragateError("--release needs the kubernetes client: pip install 'loragate[cluster]'") from None
        try:
            config.load_incluster_config()
            default_namespace = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read_text().strip()
        except (config.ConfigException, OSError):
            try:
                config.load_kube_config(config_file=kubeconfig, context=context)
                contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
                chosen = next((c for c in contexts if c["name"] == context), active) if context else active
                default_namespace = (chosen or {}).get("context", {}).get("namespace") or "default"
            except (config.ConfigException, OSError, TypeError) as exc:
                raise LoragateError(f"no kubernetes configuration: {exc}") from None
        self.api = client.CoreV1Api()
        self.exceptions = client.exceptions
        self.release, self.namespace, self.port = release, namespace or default_namespace, port

    def revision(self) -> str:
        maps = self.api.list_namespaced_config_map(
            self.namespace, label_selector=PROMOTED_SELECTOR.format(release=self.release)).items
        if len(maps) != 1:
            raise LoragateError(f"release {self.release} in {self.namespace}: expected one promoted-set ConfigMap, "
                                f"found {len(maps)} (adapters.delivery reconciler?)")
        return revision((maps[0].data or {}).get(FILE_NAME, "").encode())

    def statuses(self) -> list[ReplicaStatus]:
        pods = self.api.list_namespaced_pod(self.namespace,
                                            label_selector=ENGINE_SELECTOR.format(release=self.release)).items
        out = []
        for name in engine_pods(pods):
            where = f"pod/{name}"
            try:
                answer: Any = self.api.connect_get_namespaced_pod_proxy_with_path(
                    f"{name}:{self.port}", self.namespace, "promoted", _preload_content=False)
                body = answer.data
                out.append(parse_report(where, json.loads(body)))
            except (self.exceptions.ApiException, ValueError) as exc:
                out.append(ReplicaStatus(where, unreachable=str(getattr(exc, "reason", exc))))
        return out
