"""Run Python, and so the agent, as an aarch64 process under qemu user-mode emulation.

``scripts/arm64-env`` builds (once, cached outside the clone) an arm64 Debian root with
python3.11 and the aarch64 wheels of the agent's dependencies; :func:`build_root` runs it.
:class:`Emulator` runs ``qemu-aarch64-static -L ROOT ROOT/usr/bin/python3.11`` with this
checkout's ``agent`` package (a precompiled copy: the environment sets
PYTHONDONTWRITEBYTECODE, and compiling under emulation costs seconds per start).

    emu = Emulator(build_root(), stage_source(tmp / "src"))
    out = emu.python("import platform; print(platform.machine())")   # "aarch64\\n"
"""

from __future__ import annotations

import compileall
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
ARM64_ENV = REPO / "scripts" / "arm64-env"
#: The exit code of scripts/arm64-env when the root cannot be built on this machine.
CANNOT_BUILD = 3
_CANNOT = "cannot build the arm64 env here: "
PYTHON = "usr/bin/python3.11"
#: Variables of the native interpreter that must not leak into the emulated one.
_HOST_ONLY = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONPYCACHEPREFIX", "VIRTUAL_ENV")


class Arm64Unavailable(Exception):
    """The arm64 root cannot be built here (no qemu, no apt-get, not root...)."""


def build_root(timeout: float = 900.0) -> Path:
    """The arm64 root of ``scripts/arm64-env`` (built when missing or stale).

    Raises:
        Arm64Unavailable: the script says it cannot be built on this machine (its reason).
        RuntimeError: the build failed (the end of its output).
    """
    if shutil.which("bash") is None:
        raise Arm64Unavailable("no bash to run scripts/arm64-env")
    done = subprocess.run(
        [str(ARM64_ENV)], capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode == CANNOT_BUILD:
        lines = done.stderr.strip().splitlines() or ["(no reason given)"]
        reason = lines[-1].removeprefix("[arm64-env] ").removeprefix(_CANNOT)
        raise Arm64Unavailable(reason)
    if done.returncode != 0:
        raise RuntimeError(f"scripts/arm64-env failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def stage_source(dest: Path) -> Path:
    """Copy ``agent/`` and ``device_profiles/`` to ``dest`` and compile them; ``dest``.

    The native CPython is 3.11 like the emulated one, so its bytecode is valid there.
    """
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "agent", dest / "agent", ignore=ignore)
    shutil.copytree(REPO / "device_profiles", dest / "device_profiles")
    if sys.version_info[:2] == (3, 11):
        compileall.compile_dir(dest / "agent", quiet=1, workers=0)
    return dest


@dataclass(frozen=True)
class Emulator:
    """``qemu-aarch64-static`` running the root's python3.11 on a staged agent source."""

    root: Path
    source: Path
    qemu: str = "qemu-aarch64-static"

    def command(self, *args: str) -> list[str]:
        """The command line that runs ``python3.11 ARGS`` as an aarch64 process."""
        return [self.qemu, "-L", str(self.root), str(self.root / PYTHON), *args]

    def env(self) -> dict[str, str]:
        """The environment: the staged source on PYTHONPATH, the root as QEMU_LD_PREFIX."""
        env = {k: v for k, v in os.environ.items() if k not in _HOST_ONLY}
        env.update(
            PYTHONPATH=str(self.source),
            PYTHONDONTWRITEBYTECODE="1",
            # For aarch64 subprocesses started through binfmt_misc, where it is enabled.
            QEMU_LD_PREFIX=str(self.root),
        )
        env.pop("EDGE_AGENT_PROFILES_DIR", None)
        return env

    def popen(self, args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``python3.11 ARGS`` (``kwargs`` go to :class:`subprocess.Popen`)."""
        return subprocess.Popen(self.command(*args), env=self.env(), cwd=self.source, **kwargs)

    def python(self, code: str, *args: str, timeout: float = 120.0) -> str:
        """Run ``python3.11 -c CODE ARGS``; its stdout.

        Raises:
            AssertionError: it exits non-zero (with its stderr).
        """
        done = subprocess.run(
            self.command("-c", code, *args),
            env=self.env(),
            cwd=self.source,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert done.returncode == 0, f"emulated python exited {done.returncode}:\n{done.stderr}"
        return done.stdout
