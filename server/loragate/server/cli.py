"""``loragate proxy``: run the metrics proxy in front of an OpenAI-compatible upstream.

The local stack (``loragate up``) and the chart's sidecar run this same entry point. Settings
come from ``--config FILE``, ``LORAGATE_PROXY_*`` variables and the flags below, in that order
of precedence (see :mod:`loragate.server.config`). Logs are JSON lines on stderr: one line per
judged request (``"event": "request"``) and the proxy's own events.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time

from loragate.server.config import load_config


class JsonLineFormatter(logging.Formatter):
    """One JSON object a line. A message that is itself a JSON object is merged in."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        message = record.getMessage()
        if message.startswith("{"):
            try:
                line.update(json.loads(message))
            except ValueError:
                line["message"] = message
        else:
            line["message"] = message
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line)


def configure(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--upstream", help="base URL of the engine, e.g. http://127.0.0.1:8001")
    parser.add_argument("--contracts", help="adapters.yaml: contracts to judge outputs by")
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default 8000)")
    parser.add_argument("--config", help="YAML file with any of the settings (keys as in the docs)")
    parser.add_argument("--promoted-set", metavar="FILE",
                        help="promoted-set file to apply to the engine at run time and report on /promoted "
                             "(LORAGATE_PROXY_PROMOTED_SET; loragate.server.reconciler)")
    parser.add_argument("--drain-timeout", type=float, metavar="SECONDS",
                        help="after SIGTERM, seconds requests in flight may take to finish while new ones "
                             "get 503 (default 25; LORAGATE_PROXY_DRAIN_TIMEOUT_S)")


def setup_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLineFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


def _raise_open_files_limit(max_connections: int) -> None:
    """Raise the soft open-files limit towards the hard one, so the connection cap, not the
    file-descriptor limit, is what bounds client connections (each also may hold one to the engine)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * max_connections + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if new > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < wanted:
            logging.getLogger("loragate.proxy").warning(
                "open-files limit %d is below what %d connections need (%d)", new, max_connections, wanted)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from loragate.server.app import ProxyApp
    from loragate.server.serving import UVICORN_SETTINGS, protocol_class

    config = load_config(args.config, upstream=args.upstream, contracts=args.contracts,
                         host=args.host, port=args.port, drain_timeout_s=getattr(args, "drain_timeout", None),
                         promoted_set=getattr(args, "promoted_set", None))
    setup_logging(logging.DEBUG if getattr(args, "verbose", False) else logging.INFO)
    app = ProxyApp(config)
    logging.getLogger("loragate.proxy").info(json.dumps({
        "event": "start", "upstream": config.upstream, "listen": f"{config.host}:{config.port}",
        "contracts": str(config.contracts) if config.contracts else None,
        "auth": bool(config.api_keys), "admin_endpoints": bool(config.admin_key),
        "shadows": [dataclasses.asdict(s) for s in config.shadows],
        "promoted_set": str(config.promoted_set) if config.promoted_set else None,
    }))
    _raise_open_files_limit(config.max_connections)
    from loragate.server.drain import DrainingServer

    settings = {**UVICORN_SETTINGS, "http": protocol_class(config.server_limits(), app.server_events())}
    server = DrainingServer(uvicorn.Config(app, host=config.host, port=config.port, lifespan="on", **settings),
                            app, drain_timeout_s=config.drain_timeout_s)
    server.run()
    return 0 if server.started else 3  # as uvicorn.run: 3 when start-up failed
