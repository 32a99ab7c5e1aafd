"""The dashboard against a real fleet: mosquitto, two agents, the collector serving ``--http``.

One fleet per module (starting agents costs seconds each); the tests run in file order and
only the last one kills an agent. The browser test drives Debian's chromium through
Playwright (``executable_path``; nothing is downloaded) and the Prometheus test scrapes
``/metrics`` with a real Prometheus server.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edgefleet.operator.releases import Broker as Operator
from edgefleet.operator.releases import build_release, publish_release

from .conftest import REPO, cli_command
from .mqtt_helpers import AgentProcess, Broker, agent_config, free_port, wait_for

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
FP32 = REPO / "models" / "efficientnet-lite0-fp32.tflite"
TOKEN = "s3cret-token"


@dataclass
class Fleet:
    broker: Broker
    agents: dict[str, AgentProcess]
    collector: subprocess.Popen[bytes]
    url: str
    workdir: Path
    keys: tuple[Path, Path]

    def get(self, path: str, token: str | None = TOKEN) -> Any:
        request = urllib.request.Request(self.url + path)
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if path.startswith("/api/") else body.decode()

    def row(self, device: str) -> dict[str, Any] | None:
        rows = self.get("/api/fleet")["devices"]
        return next((r for r in rows if r["device"] == device), None)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> Iterator[Fleet]:
    work = tmp_path_factory.mktemp("dashboard")
    broker = Broker(work).start()
    pem = keys[1].read_text().replace("\n", "\\n")
    agents = {}
    for name in ("cam-1", "cam-2"):
        folder = work / name
        folder.mkdir()
        config = agent_config(
            folder,
            broker.url,
            device=name,
            fps=10,
            # keepalive 5 s: the broker fires the last will within 7.5 s of a kill
            mqtt_extra="keepalive_s: 5\n",
            extra=f'rollout:\n  trusted_keys: {{release: "{pem}"}}\n  health_frames: 10\n',
            jsonl=False,
        )
        agents[name] = AgentProcess(config)
    token_file = work / "token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    log = (work / "collector.log").open("wb")
    collector = subprocess.Popen(
        cli_command(
            "collect",
            "--broker",
            broker.url,
            "--db",
            f"sqlite:///{work / 'fleet.db'}",
            "--http",
            f"127.0.0.1:{port}",
            "--http-token-file",
            str(token_file),
            "--metrics-device-histograms",
        ),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    started = Fleet(broker, agents, collector, f"http://127.0.0.1:{port}", work, keys)

    def both_online() -> bool:
        try:
            rows = started.get("/api/fleet")["devices"]
        except (OSError, urllib.error.URLError):
            return False
        return bool(sum(r["state"] == "online" and (r["fps"] or 0) > 0 for r in rows) == 2)

    try:
        wait_for(both_online, 60, "both agents online with fps on the dashboard")
        yield started
    finally:
        for agent in agents.values():
            if agent.proc.poll() is None:
                agent.kill()
            else:
                agent._fh.close()
        collector.terminate()
        collector.wait(10)
        log.close()
        broker.kill()


def test_the_api_shows_each_device_with_fresh_figures(fleet: Fleet) -> None:
    body = fleet.get("/api/fleet")
    assert body["summary"]["devices"] == 2
    assert body["summary"]["by_state"] == {"online": 2}
    assert body["summary"]["by_model"] == {"efficientnet-lite0 v0": 2}
    row = fleet.row("cam-1")
    assert row is not None
    assert row["age_s"] < 3
    assert row["metrics_interval_s"] == 1
    assert 5 < row["fps"] < 15
    assert row["latency_p99_ms"] >= row["latency_p50_ms"] > 0
    assert row["latency_window"] > 0
    assert row["prediction"]["label"]
    assert row["delegate"] == "cpu"
    wait_for(lambda: len(fleet.get("/api/devices/cam-1")["series"]) >= 2, 10, "two metrics")
    detail = fleet.get("/api/devices/cam-1")
    assert detail["predictions"]
    assert detail["presence_history"][0]["state"] == "online"
    # fps moves: two reads a few seconds apart see different series ends
    first = detail["series"][-1]["ts"]
    wait_for(lambda: fleet.get("/api/devices/cam-1")["series"][-1]["ts"] > first, 5, "metrics")


def test_without_the_token_nothing_is_served(fleet: Fleet) -> None:
    for path in ("/", "/api/fleet", "/metrics", "/api/events"):
        with pytest.raises(urllib.error.HTTPError) as caught:
            fleet.get(path, token=None)
        caught.value.close()
        assert caught.value.code == 401
        assert caught.value.headers["WWW-Authenticate"].startswith("Basic")
    with pytest.raises(urllib.error.HTTPError) as wrong:
        fleet.get("/api/fleet", token="wrong")
    wrong.value.close()
    # what a browser sends after its login prompt: basic auth with the token as password
    request = urllib.request.Request(fleet.url + "/api/fleet")
    request.add_header(
        "Authorization", "Basic " + base64.b64encode(b"ops:" + TOKEN.encode()).decode()
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert json.loads(response.read())["summary"]["devices"] == 2


def test_metrics_pass_promtool_and_carry_the_histograms(fleet: Fleet) -> None:
    text = fleet.get("/metrics")
    assert 'edgefleet_device_up{device="cam-1"} 1.0' in text
    assert 'edgefleet_device_info{agent_version="' in text
    assert 'edgefleet_device_latency_seconds_bucket{device="cam-1",le="+Inf",stage="total"}' in text
    assert (
        'edgefleet_latency_seconds_bucket{delegate="cpu",le="+Inf",model="efficientnet-lite0"'
        in text
    )
    assert "edgefleet_inferences_total" in text
    if not Path(PROMTOOL).exists():
        pytest.skip("promtool not installed (./dev test installs Debian's prometheus)")
    checked = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text.encode(), capture_output=True, check=False
    )
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()
    # cumulative buckets: the +Inf bucket equals the count, and each bucket <= the next
    buckets = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith('edgefleet_device_latency_seconds_bucket{device="cam-1"')
        and 'stage="total"' in line
    ]
    assert buckets == sorted(buckets)
    assert buckets[-1] > 0


def test_a_real_prometheus_scrapes_the_fleet(fleet: Fleet, tmp_path: Path) -> None:
    if not Path(PROMETHEUS).exists():
        pytest.skip("prometheus not installed (./dev test installs Debian's prometheus)")
    port = free_port()
    host = fleet.url.removeprefix("http://")
    (tmp_path / "token").write_text(TOKEN)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: edgefleet\n"
        f"    authorization: {{credentials_file: {tmp_path / 'token'}}}\n"
        f"    static_configs: [{{targets: ['{host}']}}]\n"
    )
    log = (tmp_path / "prometheus.log").open("wb")
    server = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def up_values() -> dict[str, str]:
        query = f"http://127.0.0.1:{port}/api/v1/query?query=edgefleet_device_up"
        try:
            with urllib.request.urlopen(query, timeout=5) as response:
                result = json.loads(response.read())["data"]["result"]
        except (OSError, urllib.error.URLError, KeyError):
            return {}
        return {r["metric"]["device"]: r["value"][1] for r in result}

    try:
        wait_for(lambda: up_values() == {"cam-1": "1", "cam-2": "1"}, 60, "prometheus query")
    finally:
        server.terminate()
        server.wait(10)
        log.close()


def _top(*args: str) -> subprocess.CompletedProcess[str]:
    """``edgefleet top ... --once`` on a 200-column terminal."""
    return subprocess.run(
        cli_command("top", *args, "--once"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )


def test_top_renders_the_fleet_from_the_broker(fleet: Fleet) -> None:
    out = _top("--broker", fleet.broker.url, "--wait", "2.5")
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if "cam-" in line]
    assert len(lines) == 2
    assert all("online" in line and "efficientnet-lite0 v0" in line for line in lines)
    assert "2 devices" in out.stdout
    via_collector = _top("--collector", fleet.url, "--token-file", str(fleet.workdir / "token"))
    assert via_collector.returncode == 0, via_collector.stderr
    assert sum("cam-" in line for line in via_collector.stdout.splitlines()) == 2


def _publish_rollout(fleet: Fleet, device: str) -> None:
    private, _ = fleet.keys
    manifest, blobs = build_release({"cpu": FP32}, "lite0-float", 7, private, "release", 3600)
    with Operator(fleet.broker.url) as operator:
        publish_release(operator, manifest, blobs, [f"device:{device}"])


def test_the_page_follows_the_fleet_live(fleet: Fleet, tmp_path: Path) -> None:
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed (./dev test installs it)")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_context(
            http_credentials={"username": "ops", "password": TOKEN},
            viewport={"width": 1600, "height": 700},
        ).new_page()
        page.goto(fleet.url + "/")
        page.wait_for_selector('#conn[data-state="live"]')
        for name in ("cam-1", "cam-2"):
            page.wait_for_selector(f'tr[data-device="{name}"][data-state="online"]')
        fps = page.locator('tr[data-device="cam-1"] td.fps')
        first = fps.inner_text()
        assert float(first) > 0
        # fps is live: the operator halves cam-1's frame rate (the `set` command) and the
        # cell changes without a reload (a steady capped rate alone can read 10.00 for minutes)
        with Operator(fleet.broker.url) as operator:
            operator.publish(
                "edgefleet/v1/devices/cam-1/cmd/set", b'{"fps_cap": 5}', retain=False
            ).wait_for_publish(10)
        page.wait_for_function(
            "(before) => document.querySelector('tr[data-device=\"cam-1\"] td.fps').textContent"
            " !== before",
            arg=first,
            timeout=20000,
        )
        # a rollout to cam-1: the page shows it moving and converging
        _publish_rollout(fleet, "cam-1")
        page.wait_for_selector(
            'tr[data-device="cam-1"] td.rollout:text-matches("active")', timeout=60000
        )
        assert "lite0-float v7" in page.locator('tr[data-device="cam-1"]').inner_text()
        page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
        # SIGKILL cam-2: offline (last will) within the keepalive bound, no reload
        killed = time.monotonic()
        fleet.agents["cam-2"].kill()
        page.wait_for_selector('tr[data-device="cam-2"][data-state="offline"]', timeout=20000)
        assert time.monotonic() - killed < 1.5 * 5 + 3  # keepalive 5 s, 1 s update cadence
        assert page.locator('tr[data-device="cam-1"]').get_attribute("data-state") == "online"
        # the device page: charts drawn, predictions listed
        page.goto(fleet.url + "/device/cam-1")
        page.wait_for_selector("#chart-fps path[data-series=fps]")
        page.wait_for_selector("#predictions tbody tr")
        # the page says when its own connection to the collector is lost
        fleet.collector.kill()
        fleet.collector.wait(10)
        page.wait_for_selector('#conn[data-state="lost"]', timeout=20000)
        browser.close()
    if os.environ.get("DOCS_SCREENSHOTS"):  # how docs/img/dashboard.png is made
        shutil.copy(tmp_path / "dashboard.png", REPO / "docs" / "img" / "dashboard.png")
