"""A TCP proxy that makes a real broker look like one that speaks only MQTT 3.1.1."""

from __future__ import annotations

import contextlib
import socket
import threading


class V311OnlyProxy:
    """A TCP proxy in front of a real broker that refuses MQTT 5, like a 3.1.1-only broker.

    A CONNECT with protocol level 5 is answered with the 3.1.1 CONNACK "unacceptable
    protocol version" (``mode="connack"``) or with a closed connection (``mode="close"``);
    any other connection is piped to ``upstream_port`` unchanged.
    """

    def __init__(self, upstream_port: int, mode: str = "connack") -> None:
        if mode not in ("connack", "close"):
            raise ValueError(mode)
        self.mode = mode
        self.upstream_port = upstream_port
        self.refused_v5 = 0
        self.accepted = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept_loop, daemon=True, name="v311-proxy").start()

    def drop_connections(self) -> None:
        """Reset every piped connection (the client sees a lost connection)."""
        with self._lock:
            conns, self._open = self._open, []
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        self._server.close()
        self.drop_connections()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            first = _read_packet(conn)
        except OSError:
            conn.close()
            return
        # CONNECT: fixed header, remaining length, then 00 04 'MQTT' and the level byte.
        level = first[first.index(b"MQTT") + 4] if b"MQTT" in first[:16] else 0
        if level == 5:
            with self._lock:
                self.refused_v5 += 1
            if self.mode == "connack":
                with contextlib.suppress(OSError):
                    conn.sendall(b"\x20\x02\x00\x01")
            conn.close()
            return
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        upstream.sendall(first)
        with self._lock:
            self.accepted += 1
            self._open += [conn, upstream]
        for a, b in ((conn, upstream), (upstream, conn)):
            threading.Thread(target=_pipe, args=(a, b), daemon=True).start()


def _read_packet(conn: socket.socket) -> bytes:
    """One whole MQTT packet (fixed header included) from ``conn``."""
    head = _read_exact(conn, 1)
    length, mult = 0, 1
    while True:
        byte = _read_exact(conn, 1)
        head += byte
        length += (byte[0] & 0x7F) * mult
        mult *= 128
        if not byte[0] & 0x80:
            break
    return head + _read_exact(conn, length)


def _read_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise OSError("closed")
        data += chunk
    return data


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while chunk := src.recv(65536):
            dst.sendall(chunk)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
