"""systemd integration: sd_notify over real datagram sockets, the health-gated watchdog,
the unit file (``systemd-analyze``), and ``scripts/install-agent`` staged into a temp root."""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import yaml

from agent.config import parse_config
from agent.profiles.schema import Memory
from agent.systemd import (
    Notifier,
    Watchdog,
    main,
    memory_max,
    stuck_worker_check,
    watchdog_interval,
)

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "edge-agent.service"
INSTALL = REPO / "scripts" / "install-agent"


# --- a real notification socket, as systemd opens it -------------------------------------


class Listener:
    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env = {"NOTIFY_SOCKET": env_value}

    def recv(self) -> str:
        return self.sock.recv(4096).decode()

    def drain(self) -> list[str]:
        self.sock.settimeout(0.05)
        got = []
        try:
            while True:
                got.append(self.recv())
        except TimeoutError:
            pass
        self.sock.settimeout(2.0)
        return got


def _listener(kind: str) -> Iterator[Listener]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(2.0)
    if kind == "path":
        folder = tempfile.mkdtemp(prefix="sdn-")  # short: sun_path holds 108 bytes
        path = os.path.join(folder, "notify")
        sock.bind(path)
        yield Listener(sock, path)
        shutil.rmtree(folder)
    else:
        name = f"edge-agent-test-{uuid.uuid4().hex}"
        sock.bind("\0" + name)
        yield Listener(sock, "@" + name)
    sock.close()


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest) -> Iterator[Listener]:
    yield from _listener(request.param)


@pytest.fixture
def path_listener() -> Iterator[Listener]:
    yield from _listener("path")


def test_messages_arrive_exactly(listener: Listener) -> None:
    n = Notifier.from_env(listener.env)
    assert n.enabled
    assert n.ready("serving 2 models")
    assert listener.recv() == "READY=1\nSTATUS=serving 2 models"
    assert n.status("model face: loading\nstep 2")
    assert listener.recv() == "STATUS=model face: loading step 2"
    assert n.last_status == "model face: loading step 2"
    n.watchdog()
    assert listener.recv() == "WATCHDOG=1"
    n.extend_timeout(90)
    assert listener.recv() == "EXTEND_TIMEOUT_USEC=90000000"
    n.stopping()
    assert listener.recv() == "STOPPING=1"
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.reloading()
    fields = listener.recv().split("\n")
    assert fields[0] == "RELOADING=1"
    usec = int(fields[1].removeprefix("MONOTONIC_USEC="))
    assert before <= usec <= before + 5_000_000
    with pytest.raises(ValueError):
        n.extend_timeout(0)
    n.close()


def test_no_socket_is_a_silent_no_op(caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier.from_env({})
    assert not n.enabled
    assert not n.ready("x") and not n.watchdog() and not n.stopping()
    assert caplog.records == []
    vsock = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not vsock.enabled and "not a unix socket" in caplog.text


def test_send_failure_never_raises_and_logs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    with caplog.at_level(logging.WARNING, logger="agent.systemd"):
        for _ in range(3):
            assert n.watchdog() is False
    assert len(caplog.records) == 1
    assert "cannot notify systemd" in caplog.records[0].getMessage()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "self"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "30s"}, None),
        ({"WATCHDOG_USEC": "500000"}, 0.25),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env) == expected


# --- the watchdog ----------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_watchdog_pings_only_while_every_worker_is_healthy(
    path_listener: Listener, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    busy: dict[str, float | None] = {"face": None, "ocr": None}
    checks = [stuck_worker_check(m, partial(busy.get, m), 20.0, clock=clock) for m in busy]
    notifier = Notifier.from_env(path_listener.env)
    dog = Watchdog(notifier, 10.0, checks[:1], clock=clock)
    dog.add_check(checks[1])
    notifier.ready("serving 2 models")
    assert path_listener.drain() == ["READY=1\nSTATUS=serving 2 models"]

    def run(until: float) -> list[str]:
        while clock.now < until:  # a main loop waking every second
            dog.tick()
            clock.now += 1.0
        return path_listener.drain()

    assert dog.seconds_until_due() == 0.0
    assert run(1025) == ["WATCHDOG=1"] * 3  # at 1000, 1010, 1020: rate-limited
    assert dog.seconds_until_due() == pytest.approx(5.0)
    busy["face"] = clock.now  # a request starts at 1025 and never finishes
    assert run(1046) == ["WATCHDOG=1"] * 2  # 1030, 1040: the job is 15 s old, still fine
    with caplog.at_level(logging.WARNING, logger="agent.systemd"):
        got = run(1050)  # 1046..1049: over 20 s
    assert got == [
        f"STATUS=unhealthy: worker for model face stuck for {s} s" for s in (21, 22, 23, 24)
    ]
    assert dog.reason == "worker for model face stuck for 24 s"
    busy["ocr"] = clock.now - 30
    assert run(1052) == [
        "STATUS=unhealthy: worker for model face stuck for 25 s; "
        "worker for model ocr stuck for 30 s",
        "STATUS=unhealthy: worker for model face stuck for 26 s; "
        "worker for model ocr stuck for 31 s",
    ]
    unhealthy_logs = [r for r in caplog.records if "unhealthy" in r.getMessage()]
    assert len(unhealthy_logs) == 1 and unhealthy_logs[0].levelno == logging.ERROR
    busy["face"] = busy["ocr"] = None  # both finish: pings resume at once, status restored
    assert run(1053) == ["STATUS=serving 2 models", "WATCHDOG=1"]
    assert dog.reason is None
    assert run(1070) == ["WATCHDOG=1"]  # 1062; the next is due at 1072


def test_a_failing_check_counts_as_unhealthy(path_listener: Listener) -> None:
    def broken() -> str | None:
        raise RuntimeError("queue gone")

    dog = Watchdog(Notifier.from_env(path_listener.env), 5.0, [broken], clock=Clock())
    assert dog.tick() == "health check failed: RuntimeError: queue gone"
    assert path_listener.drain() == [
        "STATUS=unhealthy: health check failed: RuntimeError: queue gone"
    ]


def test_without_a_watchdog_checks_still_set_the_status(path_listener: Listener) -> None:
    clock = Clock()
    check = stuck_worker_check("face", lambda: clock.now - 90, 60.0, clock=clock)
    dog = Watchdog(Notifier.from_env(path_listener.env), None, [check], clock=clock)
    assert dog.interval_s is None and dog.seconds_until_due() is None
    assert dog.tick() == "worker for model face stuck for 90 s"
    assert path_listener.drain() == ["STATUS=unhealthy: worker for model face stuck for 90 s"]
    with pytest.raises(ValueError):
        Watchdog(Notifier(None), 0.0)
    with pytest.raises(ValueError):
        stuck_worker_check("face", lambda: None, 0)


# --- the memory limit --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("memory", "total", "expected"),
    [
        (Memory(), 8 * 2**30, None),
        (Memory(limit_fraction=0.5), 8 * 2**30, "50%"),
        (Memory(limit_fraction=0.5), None, "50%"),
        (Memory(limit_fraction=0.125), 8 * 2**30, str(2**30)),
        (Memory(limit_mib=768), 8 * 2**30, "768M"),
        (Memory(limit_mib=768, limit_fraction=0.5), 1 * 2**30, str(2**29)),
        (Memory(limit_mib=768, limit_fraction=0.5), 8 * 2**30, str(768 * 2**20)),
        (Memory(limit_mib=768, limit_fraction=0.5), None, "768M"),
    ],
)
def test_memory_max(memory: Memory, total: int | None, expected: str | None) -> None:
    assert memory_max(memory, total) == expected


def test_memory_dropin_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["memory-dropin", "--profile", "jetson-orin"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("[Service]\nMemoryMax=50%\n") and "'jetson-orin'" in out
    assert main(["memory-dropin", "--profile", "no-such-board"]) == 2
    assert capsys.readouterr().err.startswith("error: config_invalid: unknown device profile")


# --- the unit file -----------------------------------------------------------------------


def _unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_unit_settings() -> None:
    s = _unit_settings(UNIT.read_text())
    for key, value in {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogSec": "30",
        "Restart": "on-failure",
        "User": "edge-agent",
        "StateDirectory": "edge-agent",
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "KillSignal": "SIGTERM",
        "ExecStart": "/opt/edge-agent/.venv/bin/edge-agent run --config /etc/edge-agent/agent.yaml",
    }.items():
        assert s[key] == [value], key
    # Accelerator device nodes must stay reachable: no device allow-list, no private /dev.
    for forbidden in ("PrivateDevices", "DeviceAllow", "DevicePolicy", "ProtectClock"):
        assert forbidden not in s
    script = INSTALL.read_text()
    assert "OPT=/opt/edge-agent; VENV=$OPT/.venv; ETC=/etc/edge-agent" in script


def _systemd_version() -> int:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    out = subprocess.run(
        ["systemd-analyze", "--version"], capture_output=True, text=True, check=True
    )
    return int(re.match(r"systemd (\d+)", out.stdout).group(1))  # type: ignore[union-attr]


def _verify(unit_dir: Path) -> list[str]:
    """``systemd-analyze verify`` on a copy whose ExecStart exists; its complaints."""
    version = _systemd_version()
    unit = unit_dir / "edge-agent.service"
    unit.write_text(re.sub(r"(?m)^ExecStart=.*$", "ExecStart=/bin/true", unit.read_text()))
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    if version < 254:  # RestartSteps=/RestartMaxDelaySec= are systemd 254's; older ones skip them
        lines = [
            ln for ln in lines if not re.search(r"Unknown key '?Restart(Steps|MaxDelaySec)", ln)
        ]
    return lines


def test_unit_verifies_cleanly(tmp_path: Path) -> None:
    shutil.copy(UNIT, tmp_path / "edge-agent.service")
    assert _verify(tmp_path) == []
    # ...and the check can fail: a misspelt key is reported.
    (tmp_path / "edge-agent.service").write_text(UNIT.read_text() + "[Service]\nWatchdogSecs=5\n")
    assert any("WatchdogSecs" in ln for ln in _verify(tmp_path))


def test_unit_exposure_is_low(tmp_path: Path) -> None:
    if _systemd_version() < 250:
        pytest.skip("systemd-analyze security --offline needs systemd >= 250")
    shutil.copy(UNIT, tmp_path / "edge-agent.service")
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(tmp_path / "edge-agent.service")],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for edge-agent.service: ([\d.]+)", proc.stdout)
    assert match is not None, proc.stdout + proc.stderr
    assert float(match.group(1)) <= 3.0


# --- scripts/install-agent ------------------------------------------------------------------


def _install(
    root: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(INSTALL), "--prefix", str(root), "--python", sys.executable, *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A target root whose /etc/group has two of the device groups."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "group").write_text("root:x:0:\nvideo:x:44:\nplugdev:x:46:\n")
    return tmp_path


def test_install_into_a_prefix(root: Path) -> None:
    proc = _install(root, "--profile", "raspberry-pi-5", "--device-id", "cam-07")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    config = root / "etc/edge-agent/agent.yaml"
    data = yaml.safe_load(config.read_text())
    assert data == {
        "device_id": "cam-07",
        "profile": "raspberry-pi-5",
        "mqtt": {"url": "mqtt://127.0.0.1:1883"},
        "models": [],
    }
    assert parse_config(data).device_id == "cam-07"  # the agent itself accepts it
    assert config.stat().st_mode & 0o777 == 0o640
    assert (root / "var/lib/edge-agent").stat().st_mode & 0o777 == 0o750
    units = root / "etc/systemd/system"
    assert (units / "edge-agent.service").read_text() == UNIT.read_text()
    assert (
        (units / "edge-agent.service.d/memory.conf")
        .read_text()
        .endswith("[Service]\nMemoryMax=50%\n")
    )
    assert (
        (units / "edge-agent.service.d/groups.conf")
        .read_text()
        .endswith("[Service]\nSupplementaryGroups=video plugdev\n")
    )
    # Nothing that acts on this machine ran: it is printed instead.
    assert "skipped (--prefix): useradd --system" in proc.stdout
    assert "skipped (--prefix): usermod --append --groups video,plugdev edge-agent" in proc.stdout
    assert not (root / "opt/edge-agent/.venv").exists()

    # The staged unit with its drop-ins verifies.
    staged = root / "verify"
    shutil.copytree(units, staged)
    assert _verify(staged) == []

    # Idempotent: a second run keeps an edited config and changes nothing else.
    config.write_text(config.read_text().replace("cam-07", "cam-08"))
    again = _install(root, "--profile", "raspberry-pi-5", "--device-id", "cam-07")
    assert again.returncode == 0, again.stderr
    assert "cam-08" in config.read_text()
    assert "kept existing /etc/edge-agent/agent.yaml" in again.stdout
    assert "unchanged: /etc/systemd/system/edge-agent.service" in again.stdout
    assert "wrote" not in again.stdout


def test_install_takes_the_memory_limit_from_the_profile(root: Path) -> None:
    profiles = root / "etc/edge-agent/profiles"
    profiles.mkdir(parents=True)
    text = (REPO / "device_profiles/raspberry-pi-5.yaml").read_text()
    custom = re.sub(r"(?m)^memory:.*$", "memory: {limit_mib: 768}", text)
    (profiles / "pi5-small.yaml").write_text(
        custom.replace("name: raspberry-pi-5", "name: pi5-small")
    )
    proc = _install(root, "--profile", "pi5-small", "--device-id", "cam-01")
    assert proc.returncode == 0, proc.stderr
    dropins = root / "etc/systemd/system/edge-agent.service.d"
    assert (dropins / "memory.conf").read_text().endswith("MemoryMax=768M\n")
    proc = _install(root, "--profile", "pi5-small", "--memory-max", "1G")
    assert (dropins / "memory.conf").read_text().endswith("MemoryMax=1G\n")
    proc = _install(root, "--profile", "pi5-small", "--memory-max", "")
    assert proc.returncode == 0 and not (dropins / "memory.conf").exists()


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    target = tmp_path / "root"
    proc = _install(target, "--profile", "jetson-orin", "--device-id", "cam-02", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert not target.exists()
    assert "would write /etc/edge-agent/agent.yaml" in proc.stdout
    assert '    device_id: "cam-02"' in proc.stdout
    assert "    MemoryMax=50%" in proc.stdout


def test_dry_run_detects_the_profile_with_doctor() -> None:
    from agent.profiles import detect_profile

    proc = subprocess.run(
        ["bash", str(INSTALL), "--dry-run", "--device-id", "cam-03", "--python", sys.executable],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"detected device profile: {detect_profile().profile.name}" in proc.stdout
    assert "wrote" not in proc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device-id", "cam/01"], "device id 'cam/01' must match"),
        (["--mqtt-url", "http://x"], "--mqtt-url must look like"),
        (["--mqtt-url", "mqtt://broker/x"], "error: config_invalid: mqtt.url"),
        (["--memory-max", "lots"], "--memory-max must be"),
        (["--frobnicate"], "unknown option --frobnicate"),
    ],
)
def test_install_rejects_bad_arguments(root: Path, args: list[str], message: str) -> None:
    proc = _install(root, "--profile", "raspberry-pi-5", *args)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not (root / "etc/edge-agent").exists()


def test_install_rejects_an_unknown_profile_before_writing(root: Path) -> None:
    proc = _install(root, "--profile", "no-such-board")
    assert proc.returncode != 0
    assert "error: config_invalid: unknown device profile 'no-such-board'" in proc.stderr
    assert not (root / "etc/edge-agent").exists()
