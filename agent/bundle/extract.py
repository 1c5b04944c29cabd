"""Safe extraction of bundle archives (``.tar``, ``.tgz``, ``.tar.gz``).

A bundle archive comes over the network, so every member is checked before a byte is
written, and extraction is done by hand rather than by ``tarfile.extractall``:

- names must be relative, without ``..``, backslashes or NUL; no name twice;
- only regular files and directories: symlinks, hard links, devices and FIFOs are refused;
- the member count and the total uncompressed size of the files are capped;
- no shared libraries or Python files (by suffix, and ELF/Mach-O by their magic
  bytes): a bundle is data, and the agent never loads code from one (custom-op
  libraries are installed on the device and named in its profile, never shipped in
  a bundle);
- files are created fresh (``O_EXCL | O_NOFOLLOW``) with mode 0444, whatever the
  archive says, inside a directory the caller has just created;
- ``tarfile.data_filter`` gives a second opinion on every member.
"""

from __future__ import annotations

import lzma
import os
import re
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from agent.errors import BundleError

DEFAULT_MAX_BYTES = 512 * 1024 * 1024
DEFAULT_MAX_MEMBERS = 1000
#: File suffixes a bundle may not carry: code that something might load.
FORBIDDEN_SUFFIXES = frozenset(
    {".so", ".dylib", ".dll", ".pyd", ".py", ".pyc", ".pyo", ".pyw", ".pth", ".pyz"}
)
#: Leading bytes of ELF and Mach-O binaries (what ``dlopen`` would load).
BINARY_MAGIC = (
    b"\x7fELF",
    b"\xfe\xed\xfa\xce",
    b"\xfe\xed\xfa\xcf",
    b"\xce\xfa\xed\xfe",
    b"\xcf\xfa\xed\xfe",
)
_CHUNK = 1 << 20
_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class ExtractLimits:
    """Caps applied while extracting one archive."""

    #: Total size of the regular files, uncompressed.
    max_bytes: int = DEFAULT_MAX_BYTES
    #: Number of members (files and directories).
    max_members: int = DEFAULT_MAX_MEMBERS


DEFAULT_LIMITS = ExtractLimits()


def _unsafe(message: str) -> BundleError:
    return BundleError(message, code="unsafe_archive")


def extract_archive(archive: Path, dest: Path, limits: ExtractLimits = DEFAULT_LIMITS) -> None:
    """Extract ``archive`` into ``dest``, an empty directory the caller owns.

    On failure ``dest`` may hold a partial extraction; the caller removes it.

    Raises:
        BundleError: ``bad_archive`` when the file is not a readable tar archive;
            ``unsafe_archive`` when a member breaks a rule above or a limit.
    """
    try:
        with tarfile.open(archive, mode="r:*") as tf:
            _extract_members(tf, dest, limits)
    except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        raise BundleError(
            f"{archive.name}: not a readable tar archive ({exc})", code="bad_archive"
        ) from None


def _extract_members(tf: tarfile.TarFile, dest: Path, limits: ExtractLimits) -> None:
    count = 0
    total = 0
    seen: set[str] = set()
    for member in tf:
        count += 1
        if count > limits.max_members:
            raise _unsafe(f"archive has more than {limits.max_members} members")
        name = safe_member_name(member)
        try:
            tarfile.data_filter(member, str(dest))
        except tarfile.FilterError as exc:
            raise _unsafe(f"{member.name!r}: refused ({exc})") from None
        if name is None:  # the archive's own root, "./"
            continue
        if name in seen:
            raise _unsafe(f"{name!r} appears twice in the archive")
        seen.add(name)
        target = dest.joinpath(*name.split("/"))
        try:
            if member.isdir():
                target.mkdir(mode=0o755, parents=True, exist_ok=True)
                continue
            check_allowed_file(name)
            total += member.size
            if total > limits.max_bytes:
                raise _unsafe(f"archive unpacks to more than {limits.max_bytes} bytes")
            target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            source = tf.extractfile(member)
            if source is None:
                raise _unsafe(f"{name!r}: cannot be read as a file")
            _write_file(source, target, name)
        except OSError as exc:
            raise _unsafe(f"{name!r}: cannot be extracted ({exc.strerror})") from None


def safe_member_name(member: tarfile.TarInfo) -> str | None:
    """The member's normalised relative path, or None for the archive root (``.``).

    Raises:
        BundleError: ``unsafe_archive`` for an absolute or escaping path, a link, a
            device or FIFO, or any member that is not a regular file or directory.
    """
    raw = member.name
    if "\0" in raw or "\\" in raw:
        raise _unsafe(f"{raw!r}: backslash or NUL in a member name")
    if raw.startswith("/") or _DRIVE.match(raw):
        raise _unsafe(f"{raw!r}: absolute path in the archive")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _unsafe(f"{raw!r}: '..' in a member name")
    if member.issym() or member.islnk():
        raise _unsafe(f"{raw!r}: links are not allowed in a bundle")
    if member.ischr() or member.isblk() or member.isfifo():
        raise _unsafe(f"{raw!r}: device files and FIFOs are not allowed in a bundle")
    if not (member.isreg() or member.isdir()):
        raise _unsafe(f"{raw!r}: unsupported member type {member.type!r}")
    if not parts:
        if not member.isdir():
            raise _unsafe(f"{raw!r}: a file with no name")
        return None
    return "/".join(parts)


def check_allowed_file(name: str) -> None:
    """Refuse file names of code (shared libraries, Python).

    Raises:
        BundleError: ``unsafe_archive`` naming the file.
    """
    suffixes = {s.lower() for s in Path(name).suffixes}
    if suffixes & FORBIDDEN_SUFFIXES:
        raise _unsafe(f"{name!r}: a bundle may not contain shared libraries or Python files")


def _write_file(source: IO[bytes], target: Path, name: str) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(target, flags, 0o644)
    with os.fdopen(fd, "wb") as out:
        first = True
        while chunk := source.read(_CHUNK):
            if first and chunk.startswith(BINARY_MAGIC):
                raise _unsafe(f"{name!r}: a bundle may not contain executables or libraries")
            first = False
            out.write(chunk)
    os.chmod(target, 0o444)
