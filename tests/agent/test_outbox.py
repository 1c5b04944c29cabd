"""The outbox: order, the bound, persistence, flushing, threads, and a kill -9 mid-write."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from agent.telemetry.outbox import Outbox, OutboxError

REPO = Path(__file__).resolve().parents[2]


class Recorder:
    """A publish callable that records what it sent and fails on demand."""

    def __init__(self, accept: int | None = None) -> None:
        self.sent: list[tuple[str, bytes, int, bool]] = []
        self.accept = accept  # how many to accept before returning False

    def __call__(self, topic: str, payload: bytes, qos: int, retain: bool) -> bool:
        if self.accept is not None and len(self.sent) >= self.accept:
            return False
        self.sent.append((topic, payload, qos, retain))
        return True

    @property
    def payloads(self) -> list[bytes]:
        return [p for _, p, _, _ in self.sent]


def fill(outbox: Outbox, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        outbox.put("edge/d/telemetry", b"m%d" % i)


def test_put_and_flush_in_order(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as outbox:
        outbox.put("edge/d/telemetry", b"a")
        outbox.put("edge/d/update", b"b", qos=1)
        outbox.put("edge/d/status", b"c", qos=1, retain=True)
        assert len(outbox) == 3
        sent = Recorder()
        assert outbox.flush(sent) == 3
        assert sent.sent == [
            ("edge/d/telemetry", b"a", 0, False),
            ("edge/d/update", b"b", 1, False),
            ("edge/d/status", b"c", 1, True),
        ]
        assert len(outbox) == 0 and outbox.flush(Recorder()) == 0


def test_full_outbox_drops_the_oldest_and_counts_them(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", max_entries=5) as outbox:
        fill(outbox, 8)
        assert len(outbox) == 5 and outbox.dropped_total == 3
        assert [e.payload for e in outbox.peek()] == [b"m3", b"m4", b"m5", b"m6", b"m7"]
    with Outbox(tmp_path / "o.db", max_entries=5) as outbox:
        assert outbox.dropped_total == 3  # persisted
        fill(outbox, 1, start=8)
        assert outbox.dropped_total == 4 and outbox.peek()[0].payload == b"m4"


def test_entries_and_counters_survive_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state" / "outbox.db"  # the folder is created
    with Outbox(path) as outbox:
        fill(outbox, 4)
        assert [outbox.next_seq() for _ in range(3)] == [1, 2, 3]
        assert outbox.next_seq("update") == 1
        outbox.flush(Recorder(accept=1))
    with Outbox(path) as outbox:
        assert len(outbox) == 3
        assert outbox.next_seq() == 4 and outbox.next_seq("update") == 2
        fill(outbox, 1, start=4)
        sent = Recorder()
        outbox.flush(sent)
        assert sent.payloads == [b"m1", b"m2", b"m3", b"m4"]
    # Ids are never reused, even after the table was emptied: order holds across restarts.
    with Outbox(path) as outbox:
        fill(outbox, 1, start=5)
        assert outbox.peek()[0].id > 5


def test_flush_stops_at_the_first_false_and_resumes_in_order(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as outbox:
        fill(outbox, 6)
        offline = Recorder(accept=2)
        assert outbox.flush(offline) == 2
        assert offline.payloads == [b"m0", b"m1"] and len(outbox) == 4
        assert outbox.flush(Recorder(accept=0)) == 0 and len(outbox) == 4
        fill(outbox, 1, start=6)
        back = Recorder()
        assert outbox.flush(back, max_items=3) == 3
        assert outbox.flush(back, max_items=3) == 2
        assert back.payloads == [b"m2", b"m3", b"m4", b"m5", b"m6"]
        assert len(outbox) == 0


def test_an_entry_the_transport_refuses_is_dropped_not_stuck(tmp_path: Path) -> None:
    def publish(topic: str, payload: bytes, qos: int, retain: bool) -> bool:
        if payload == b"m1":
            raise ValueError("invalid topic")
        sent.append(payload)
        return True

    sent: list[bytes] = []
    with Outbox(tmp_path / "o.db") as outbox:
        fill(outbox, 3)
        assert outbox.flush(publish) == 2
        assert sent == [b"m0", b"m2"] and len(outbox) == 0 and outbox.dropped_total == 1


def test_a_failing_publish_keeps_what_was_sent(tmp_path: Path) -> None:
    def publish(topic: str, payload: bytes, qos: int, retain: bool) -> bool:
        if payload == b"m2":
            raise RuntimeError("transport is gone")
        return True

    with Outbox(tmp_path / "o.db") as outbox:
        fill(outbox, 4)
        with pytest.raises(RuntimeError):
            outbox.flush(publish)
        assert [e.payload for e in outbox.peek()] == [b"m2", b"m3"]
        assert len(outbox) == 2


def test_bad_arguments_and_a_closed_outbox(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_entries"):
        Outbox(tmp_path / "o.db", max_entries=0)
    outbox = Outbox(tmp_path / "o.db")
    with pytest.raises(ValueError, match="qos"):
        outbox.put("t", b"x", qos=3)
    outbox.close()
    outbox.close()  # idempotent
    with pytest.raises(OutboxError, match="closed") as info:
        outbox.put("t", b"x")
    assert info.value.code == "outbox_unavailable"
    with pytest.raises(OutboxError):
        outbox.next_seq()


def test_an_unwritable_location_is_an_outbox_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OutboxError, match="cannot open the outbox"):
        Outbox(blocker / "o.db")


def test_a_corrupt_file_is_moved_aside_and_seq_keeps_increasing(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path) as outbox:
        assert outbox.next_seq() == 1
    path.write_bytes(b"this is not an sqlite database, it was scrambled" * 100)
    for sidecar in (tmp_path / "o.db-wal", tmp_path / "o.db-shm"):
        sidecar.unlink(missing_ok=True)
    before_ms = int(time.time() * 1000)
    with Outbox(path) as outbox:
        assert len(outbox) == 0
        assert outbox.next_seq() > before_ms  # still above any seq the old file handed out
        fill(outbox, 1)
    assert len(list(tmp_path.glob("o.db.corrupt-*"))) == 1


def test_threads_put_while_another_flushes(tmp_path: Path) -> None:
    writers, per_writer = 4, 150
    received: list[bytes] = []
    done = threading.Event()

    with Outbox(tmp_path / "o.db") as outbox:

        def write(w: int) -> None:
            for i in range(per_writer):
                outbox.put("edge/d/telemetry", f"{w}:{i}".encode())
                outbox.next_seq(f"w{w}")

        def flush() -> None:
            publish = Recorder()
            while not done.is_set() or len(outbox):
                outbox.flush(publish, max_items=50)
            received.extend(publish.payloads)

        flusher = threading.Thread(target=flush)
        flusher.start()
        threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        done.set()
        flusher.join()
        assert all(outbox.next_seq(f"w{w}") == per_writer + 1 for w in range(writers))
    assert len(received) == writers * per_writer  # each exactly once
    for w in range(writers):  # and each writer's messages in its order
        mine = [int(p.split(b":")[1]) for p in received if p.startswith(b"%d:" % w)]
        assert mine == list(range(per_writer))


_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from agent.telemetry.outbox import Outbox

    outbox = Outbox(Path(sys.argv[1]), max_entries=100_000)
    i = 0
    while True:
        seq = outbox.next_seq()
        outbox.put("edge/d/telemetry", b"%d:" % seq + b"x" * 2000)
        print(seq, flush=True)  # acknowledged: both are committed
        i += 1
    """
)


def test_kill_9_while_writing_leaves_a_readable_outbox(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, env=env, cwd=REPO
    )
    assert writer.stdout is not None
    acknowledged = 0
    try:
        deadline = time.monotonic() + 20
        while acknowledged < 150 and time.monotonic() < deadline:
            line = writer.stdout.readline()
            if not line:
                break
            acknowledged = int(line)
    finally:
        writer.send_signal(signal.SIGKILL)  # mid-write, at whatever instant this lands
        writer.wait(timeout=10)
    assert acknowledged >= 150, "the writer did not get going"

    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    conn.close()
    with Outbox(path) as outbox:
        entries = outbox.peek(limit=100_000)
        seqs = [int(e.payload.split(b":")[0]) for e in entries]
        # Everything acknowledged is there, in order, with nothing torn.
        assert len(entries) == len(outbox) >= acknowledged
        assert seqs == list(range(1, len(seqs) + 1))
        assert all(
            len(e.payload) == len(b"%d:" % s) + 2000 for e, s in zip(entries, seqs, strict=True)
        )
        assert outbox.next_seq() > acknowledged
