"""A real Prometheus server (the Debian `prometheus` binary) for the tests.

Started on a free loopback port with its own config and data directory, scraping the given
targets every second. Readiness is polled on /-/ready while the process is watched, as
for the object stores in tests/servers.py. `query` runs PromQL through the HTTP API and
raises on an invalid expression, so the dashboard's queries are checked by the real parser.
"""

from __future__ import annotations

import json
import math
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from testbed.stores import Server, _spawn, free_port

SCRAPE_INTERVAL = "1s"


class PromQLError(Exception):
    """Prometheus refused a query (bad syntax, unknown function)."""


class Prometheus:
    def __init__(self, server: Server) -> None:
        self.server = server
        self.url = server.endpoint

    def _get(self, path: str, **params: str) -> Any:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            answer = json.loads(exc.read() or b"{}")
        if answer.get("status") != "success":
            raise PromQLError(f"{params}: {answer.get('errorType')}: {answer.get('error')}")
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector of expr now: [{'metric': {...}, 'value': [t, 'v']}, ...]."""
        data = self._get("/api/v1/query", query=expr)
        if data["resultType"] != "vector":
            raise PromQLError(f"{expr}: a {data['resultType']}, not an instant vector")
        return list(data["result"])

    def values(self, expr: str) -> list[float]:
        return [float(sample["value"][1]) for sample in self.query(expr)]

    def label_values(self, label: str, match: str) -> list[str]:
        return list(self._get(f"/api/v1/label/{label}/values", **{"match[]": match}))

    def targets(self) -> list[dict[str, Any]]:
        return list(self._get("/api/v1/targets")["activeTargets"])

    def wait_for(self, expr: str, condition: Callable[[list[float]], bool],
                 timeout: float = 60) -> list[float]:
        """Poll expr until condition holds on its values; fail with the last values."""
        deadline = time.monotonic() + timeout
        while True:
            values = self.values(expr)
            if condition(values):
                return values
            if time.monotonic() > deadline:
                raise AssertionError(f"{expr} still {values} after {timeout}s; targets: "
                                     f"{self.targets()}")
            try:  # doubles as the polling interval and the liveness check
                code = self.server.process.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                continue
            raise AssertionError(f"prometheus exited with {code}\n{self.server.log_tail()}")


def finite(values: list[float]) -> bool:
    return bool(values) and all(math.isfinite(v) for v in values)


@contextmanager
def prometheus(directory: Path, targets: list[str], job: str = "cloudnbd"
               ) -> Iterator[Prometheus]:
    """A Prometheus scraping targets (HOST:PORT) every second, stopped on exit."""
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": targets}]}],
    }))
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = _spawn("prometheus", [
        "prometheus", f"--config.file={config}", f"--storage.tsdb.path={directory / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
        "--storage.tsdb.retention.time=1h"], directory, endpoint)

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"{endpoint}/-/ready", timeout=2) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    try:
        server.wait_ready(ready)
        yield Prometheus(server)
    finally:
        server.stop()
