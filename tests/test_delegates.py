"""Delegates: absence detected with reasons, discovery on fake sysfs, measured choice,
cached ranking, and failover to the next candidate and back."""

from __future__ import annotations

import dataclasses
import gc
import itertools
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import pytest

from edgefleet.app.daemon import Daemon
from edgefleet.config.agentconfig import load_config
from edgefleet.delegation.policies import PreferPolicy
from edgefleet.delegation.selection import candidate_sections, choose
from edgefleet.delegation.serving import ServedModel
from edgefleet.errors import ConfigError, UserError
from edgefleet.factory import factory_model_path
from edgefleet.inference.classifier import inspect_model, sha256_file
from edgefleet.inference.delegate import Availability
from edgefleet.inference.litert import get_runtime
from edgefleet.plugin import hookimpl
from edgefleet.plugin.manager import Plugins, make_plugin_manager
from edgefleet.plugin.registry import Registry
from edgefleet.protocol import VariantSpec
from edgefleet.rollout.preflight import preflight
from edgefleet.rollout.release import describe_variant
from edgefleet.runtime.results import Result
from edgefleet.runtime.sinks import Sink
from edgefleet_plugins.delegates.cpu import CpuConfig, CpuDelegate
from edgefleet_plugins.delegates.edgetpu import EdgeTpuConfig, EdgeTpuDelegate, discover
from edgefleet_plugins.delegates.external import ExternalConfig, ExternalDelegate
from edgefleet_plugins.delegates.gpu import GpuConfig, GpuDelegate

from .conftest import REPO

MODEL = factory_model_path()
FLOAT_MODEL = REPO / "models" / "efficientnet-lite0-fp32.tflite"


def _usb(root: Path, name: str, vendor: str, product: str) -> None:
    dev = root / "bus" / "usb" / "devices" / name
    dev.mkdir(parents=True)
    (dev / "idVendor").write_text(vendor + "\n")
    (dev / "idProduct").write_text(product + "\n")


def test_edgetpu_declines_here_with_reasons(tmp_path: Path) -> None:
    real = EdgeTpuDelegate(EdgeTpuConfig())
    available = real.availability(MODEL)
    assert not available.ok
    assert "libedgetpu.so.1 not found" in available.reason or "no EdgeTPU found" in available.reason
    lib = tmp_path / "libedgetpu.so.1"
    lib.write_bytes(b"")
    empty = EdgeTpuDelegate(
        EdgeTpuConfig(library=str(lib)), sys_root=tmp_path / "sys", dev_root=tmp_path / "dev"
    )
    assert empty.availability().reason.startswith("no EdgeTPU found")


def test_edgetpu_discovery_on_fake_sysfs(tmp_path: Path) -> None:
    sys_root, dev_root = tmp_path / "sys", tmp_path / "dev"
    _usb(sys_root, "1-1", "1d6b", "0002")  # a hub: ignored
    _usb(sys_root, "1-1.2", "1a6e", "089a")  # Coral USB before firmware load
    _usb(sys_root, "2-1", "18d1", "9302")  # Coral USB after firmware load
    dev_root.mkdir()
    (dev_root / "apex_0").write_text("")
    found = discover(sys_root, dev_root)
    assert [d.name for d in found] == ["usb:0", "usb:1", "pci:0"]
    assert "firmware" in found[0].note

    lib = tmp_path / "libedgetpu.so.1"
    lib.write_bytes(b"")
    tpu = EdgeTpuDelegate(EdgeTpuConfig(library=str(lib), device="pci:0"), sys_root, dev_root)
    assert tpu.chosen_device()[0] is not None
    # A model that was not compiled for the EdgeTPU is refused even with a device present.
    assert tpu.availability(MODEL) == Availability(False, "model is not compiled for the EdgeTPU")
    compiled = tmp_path / "m_edgetpu.tflite"
    compiled.write_bytes(MODEL.read_bytes()[:1000] + b"edgetpu-custom-op")
    assert tpu.availability(compiled).ok
    wrong = EdgeTpuDelegate(EdgeTpuConfig(library=str(lib), device="usb:5"), sys_root, dev_root)
    assert wrong.availability().reason == "no EdgeTPU matches 'usb:5' (found: usb:0, usb:1, pci:0)"


# LiteRT's Delegate.__del__ raises AttributeError after its own constructor failed on a
# library that is not a delegate; that finaliser bug is the runtime's, not ours.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to build the stand-in")
def test_a_libedgetpu_that_does_not_fit_the_runtime_is_one_clear_line(tmp_path: Path) -> None:
    """A real shared library that is not a delegate of this runtime (as a libedgetpu built
    for another TensorFlow is not): the runtime's several lines become one that says what
    to check, naming the runtime and its version."""
    source = tmp_path / "stand_in.c"
    source.write_text("int not_a_delegate(void) { return 0; }\n")
    lib = tmp_path / "libedgetpu.so.1"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib), str(source)], check=True)
    sys_root = tmp_path / "sys"
    _usb(sys_root, "1-1.2", "18d1", "9302")
    tpu = EdgeTpuDelegate(EdgeTpuConfig(library=str(lib)), sys_root, tmp_path / "dev")
    with pytest.raises(RuntimeError) as caught:
        tpu.make_interpreter(MODEL)
    message = str(caught.value)
    del caught  # its traceback holds the runtime's half-made Delegate: let it go now,
    gc.collect()  # under this test's filter, not at exit
    assert "\n" not in message
    assert message.startswith(f"{lib} did not load as a delegate of ")
    runtime = get_runtime("auto")
    assert f"{runtime.name} {runtime.version}" in message
    assert "libedgetpu and the runtime must match" in message


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_gpu_and_external_decline_here(tmp_path: Path) -> None:
    gpu = GpuDelegate(GpuConfig()).availability()
    assert not gpu.ok
    assert "not found" in gpu.reason
    bogus = tmp_path / "libnotadelegate.so"
    bogus.write_bytes(b"\x7fELF not really")
    loaded = GpuDelegate(GpuConfig(library=bogus)).availability()
    assert not loaded.ok
    assert loaded.reason
    external = ExternalDelegate(ExternalConfig(library=tmp_path / "missing.so")).availability()
    assert external == Availability(False, f"library not found: {tmp_path / 'missing.so'}")


def test_auto_picks_the_measurably_faster_candidate(plugins: Plugins) -> None:
    registry = plugins.registries.delegates
    slow = CpuConfig(threads=1, xnnpack=False)  # reference kernels: several times slower
    fast = CpuConfig(threads=1)
    started = time.monotonic()
    choice = choose("auto", [slow, fast], registry, MODEL, sha256_file(MODEL), budget_s=2.0)
    assert time.monotonic() - started < 8
    best = choice.best[0]
    assert best.label == "cpu(threads=1)"
    slow_row = next(r for r in choice.table if "xnnpack=False" in r.label)
    assert best.median_ms is not None
    assert slow_row.median_ms is not None
    assert slow_row.median_ms > best.median_ms * 1.5
    assert [r.label for r, _, _ in choice.ranked] == [
        "cpu(threads=1)",
        "cpu(threads=1,xnnpack=False)",
    ]


def test_ranking_is_cached(plugins: Plugins, tmp_path: Path) -> None:
    registry = plugins.registries.delegates
    sections = [CpuConfig(threads=1), CpuConfig(threads=2)]
    first = choose(
        "auto", sections, registry, MODEL, sha256_file(MODEL), budget_s=1.0, cache_dir=tmp_path
    )
    assert not first.from_cache
    assert (tmp_path / "delegate-ranking.json").exists()
    second = choose(
        "auto", sections, registry, MODEL, sha256_file(MODEL), budget_s=1.0, cache_dir=tmp_path
    )
    assert second.from_cache
    assert second.best[0].label == first.best[0].label


def test_prefer_skips_what_is_absent(plugins: Plugins) -> None:
    registry = plugins.registries.delegates
    config = load_config(
        None,
        plugins.registries,
        environ={},
        text="delegate: {type: prefer}\nsource: {type: synthetic}\n",
    )
    assert isinstance(config.delegate, PreferPolicy)
    sections = candidate_sections(config.delegate, config.candidates, registry)
    assert [s.type for s in sections] == ["edgetpu", "gpu", "cpu"]
    choice = choose("prefer", sections, registry, MODEL, sha256_file(MODEL))
    assert choice.best[0].label == "cpu"
    reasons = {row.label: row.reason for row in choice.table}
    assert reasons["edgetpu"]
    assert reasons["gpu"]
    with pytest.raises(UserError, match="no delegate works"):
        choose("prefer", sections[:2], registry, MODEL, sha256_file(MODEL))


def test_candidate_sections_are_validated(plugins: Plugins, tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(
        "delegate:\n  type: auto\n  candidates:\n    - {type: cpu, threads: 0}\n"
        "    - {type: warp-drive}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, plugins.registries, environ={})
    problems = [p.replace(str(tmp_path) + "/", "") for p in info.value.problems]
    assert problems[0] == (
        "agent.yaml:4: delegate.candidates[0].threads: Input should be greater than or equal to 1"
    )
    assert problems[1].startswith("agent.yaml:5: delegate.candidates[1].type: unknown delegate")


class FlakyConfig(CpuConfig):
    type: Literal["flaky"] = "flaky"  # type: ignore[assignment]


class _FlakyInterpreter:
    def __init__(self, inner: Any, broken: threading.Event) -> None:
        self._inner = inner
        self._broken = broken

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def invoke(self) -> None:
        if self._broken.is_set():
            raise RuntimeError("device vanished")
        while HANG.is_set():  # a wedged driver: invoke() just does not return
            time.sleep(0.02)
        self._inner.invoke()


BROKEN = threading.Event()
HANG = threading.Event()


class FlakyDelegate(CpuDelegate):
    """The real CPU delegate, failing on demand like an unplugged accelerator."""

    kind = "flaky"

    def availability(self, model_path: Path | None = None) -> Availability:
        return Availability(False, "unplugged") if BROKEN.is_set() else Availability(True)

    def make_interpreter(self, model_path: Path) -> Any:
        return _FlakyInterpreter(super().make_interpreter(model_path), BROKEN)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "type": "flaky"}


class FlakyPlugin:
    @hookimpl
    def edgefleet_register_delegates(self, registry: Registry[Any]) -> None:
        registry.add("flaky", FlakyConfig, FlakyDelegate, "fails on demand")


class Recorder(Sink):
    """Each result with the delegate that served it (read from the loop, as it ran)."""

    name = "recorder"

    def __init__(self) -> None:
        self.results: list[tuple[float, str, Result]] = []
        self.events: list[dict[str, Any]] = []
        self.daemon: Daemon | None = None

    def emit(self, result: Result) -> None:
        assert self.daemon is not None
        pipeline = self.daemon.agent.pipeline
        assert pipeline is not None
        self.results.append((time.monotonic(), pipeline.classifier.delegate["type"], result))

    def event(self, body: dict[str, Any]) -> None:
        self.events.append(body)


def _run_flaky_first(tmp_path: Path, policy: str) -> tuple[Daemon, Recorder, threading.Thread]:
    """An agent preferring the flaky delegate over the CPU, running in a thread for 8 s."""
    plugins = make_plugin_manager(extra=[("flaky", FlakyPlugin())])
    text = (
        f"delegate:\n  type: prefer\n{policy}  order:\n"
        "    - {type: flaky, threads: 1}\n    - {type: cpu, threads: 1}\n"
        "source: {type: synthetic, fps: 20, width: 64, height: 48}\n"
        f"sinks: []\nstate_dir: '{tmp_path}'\n"
    )
    config = load_config(None, plugins.registries, environ={}, text=text)
    recorder = Recorder()
    daemon = recorder.daemon = Daemon(config, plugins, extra_sinks=[recorder])
    runner = threading.Thread(target=daemon.run, kwargs={"duration": 8, "install_signals": False})
    runner.start()
    return daemon, recorder, runner


def test_failover_within_a_frame_and_back(tmp_path: Path) -> None:
    BROKEN.clear()
    daemon, recorder, runner = _run_flaky_first(tmp_path, "  reprobe_min_s: 0.5\n")
    try:
        deadline = time.monotonic() + 20
        while len(recorder.results) < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert {d for _, d, _ in recorder.results} == {"flaky"}
        BROKEN.set()
        broke_at = time.monotonic()
        while not recorder.events and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(1.0)
        on_cpu = [r for t, d, r in recorder.results if t > broke_at and d == "cpu"]
        assert len(on_cpu) >= 10  # still classifying, on the runner-up
        assert recorder.events[0]["event"] == "failover"
        assert recorder.events[0]["to"] == "cpu(threads=1)"
        BROKEN.clear()
        while len(recorder.events) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert recorder.events[1]["event"] == "restored"
        time.sleep(0.5)
        assert recorder.results[-1][1] == "flaky"
    finally:
        daemon.stop_requested.set()
        runner.join(10)
    pipeline = daemon.agent.pipeline
    assert pipeline is not None
    # Lost frames: the failing invoke's frame only (errors counted, nothing else dropped).
    assert pipeline.stats.errors == 1
    frames = [r.frame for _, _, r in recorder.results]
    gaps = [b - a - 1 for a, b in itertools.pairwise(frames) if b - a > 1]
    assert sum(gaps) <= 2


def test_stuck_invoke_counts_as_failure(tmp_path: Path) -> None:
    BROKEN.clear()
    HANG.clear()
    daemon, recorder, runner = _run_flaky_first(
        tmp_path, "  invoke_timeout_s: 1.0\n  reprobe_min_s: 30\n"
    )
    try:
        deadline = time.monotonic() + 20
        while len(recorder.results) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        HANG.set()
        hung_at = time.monotonic()
        while not recorder.events and time.monotonic() < deadline:
            time.sleep(0.05)
        assert recorder.events, "no failover for a hung invoke"
        assert "did not return within 1.0 s" in recorder.events[0]["reason"]
        assert time.monotonic() - hung_at < 3.0
        time.sleep(1.0)
        after = [d for t, d, _ in recorder.results if t > hung_at + 1.5]
        assert len(after) >= 10
        assert set(after) == {"cpu"}
        assert daemon.agent.healthy(30.0)  # the watchdog keeps pinging: the loop turns again
    finally:
        HANG.clear()
        daemon.stop_requested.set()
        runner.join(10)


def _wait(predicate: Callable[[], bool], seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def _float_variant() -> VariantSpec:
    plan = inspect_model(FLOAT_MODEL).plan
    spec = {"height": plan.height, "width": plan.width, "dtype": str(plan.dtype)}
    return describe_variant("cpu", FLOAT_MODEL.read_bytes(), spec, 128 * 1024)


def test_failover_after_a_rollout_keeps_the_rolled_out_model(tmp_path: Path) -> None:
    """One owner of serving: a failover (and the way back) never reverts a rollout."""
    BROKEN.clear()
    daemon, recorder, runner = _run_flaky_first(tmp_path, "  reprobe_min_s: 0.5\n")
    try:
        _wait(lambda: len(recorder.results) >= 5)
        serving = daemon.agent.serving
        assert serving is not None
        # What a rollout does: preflight on the serving delegate, then activate.
        classifier, _ = preflight(serving, _float_variant(), FLOAT_MODEL)
        assert classifier.delegate["type"] == "flaky"
        info = dataclasses.replace(classifier.info, name="lite0-float", version=7)
        serving.activate(ServedModel(FLOAT_MODEL, info), classifier)
        swapped = time.monotonic()
        _wait(lambda: sum(1 for t, _, _ in recorder.results if t > swapped) >= 5)
        BROKEN.set()
        broke = time.monotonic()
        _wait(lambda: bool(recorder.events))
        assert recorder.events[0]["event"] == "failover"
        _wait(lambda: sum(1 for t, _, _ in recorder.results if t > broke + 0.3) >= 5)
        after = [(d, r) for t, d, r in recorder.results if t > broke + 0.3]
        assert {d for d, _ in after} == {"cpu"}
        assert {(r.model, r.model_version) for _, r in after} == {("lite0-float", 7)}
        # Preflight now loads on the delegate that serves: the runner-up.
        on_cpu, _ = preflight(serving, _float_variant(), FLOAT_MODEL)
        assert on_cpu.delegate["type"] == "cpu"
        BROKEN.clear()
        _wait(lambda: len(recorder.events) >= 2)
        assert recorder.events[1]["event"] == "restored"
        back = time.monotonic()
        _wait(lambda: sum(1 for t, _, _ in recorder.results if t > back + 0.3) >= 5)
        last = [(d, r) for t, d, r in recorder.results if t > back + 0.3]
        assert {d for d, _ in last} == {"flaky"}
        assert {(r.model, r.model_version) for _, r in last} == {("lite0-float", 7)}
        pipeline = daemon.agent.pipeline
        assert pipeline is not None
        assert pipeline.classifier.info.path == FLOAT_MODEL
    finally:
        BROKEN.clear()
        daemon.stop_requested.set()
        runner.join(10)


def test_rollback_restores_the_model_on_the_delegate_serving_now(tmp_path: Path) -> None:
    """A rollback after a failover puts the old model back, on the runner-up that serves."""
    BROKEN.clear()
    daemon, recorder, runner = _run_flaky_first(tmp_path, "  reprobe_min_s: 30\n")
    try:
        _wait(lambda: len(recorder.results) >= 5)
        serving = daemon.agent.serving
        assert serving is not None
        factory = serving.model
        classifier = serving.load(FLOAT_MODEL)
        info = dataclasses.replace(classifier.info, name="lite0-float", version=2)
        previous = serving.activate(ServedModel(FLOAT_MODEL, info), classifier)
        BROKEN.set()
        _wait(lambda: bool(recorder.events))
        serving.restore(previous)
        restored = time.monotonic()
        _wait(lambda: sum(1 for t, _, _ in recorder.results if t > restored + 0.3) >= 5)
        last = [(d, r) for t, d, r in recorder.results if t > restored + 0.3]
        assert {d for d, _ in last} == {"cpu"}
        assert {r.model for _, r in last} == {factory.info.name}
        assert serving.model == factory
    finally:
        BROKEN.clear()
        daemon.stop_requested.set()
        runner.join(10)


def test_auto_times_each_invoke_beside_the_prepare_stage_work(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """auto's figure is the loop's: while each timed invoke runs, another thread prepares a
    640x480 frame, as the pipeline's prepare stage does."""
    from edgefleet.delegation import selection
    from edgefleet.inference.classifier import load_classifier
    from edgefleet.inference.preprocess import Preprocessor

    prepared: list[tuple[str, tuple[int, ...]]] = []
    real = Preprocessor.__call__

    def recording(self: Preprocessor, image: Any, out: Any) -> None:
        prepared.append((threading.current_thread().name, image.shape))
        real(self, image, out)

    monkeypatch.setattr(Preprocessor, "__call__", recording)
    clf = load_classifier(factory_model_path(), CpuDelegate(CpuConfig(threads=1)))
    prepared.clear()
    times = selection._time_invokes(clf, 0.2, max_runs=20)
    beside = [shape for name, shape in prepared if name == "measure-prepare"]
    assert len(beside) == len(times)  # one frame per timed invoke, on its own thread
    assert set(beside) == {(480, 640, 3)}
    assert not any(t.name == "measure-prepare" for t in threading.enumerate())  # joined
