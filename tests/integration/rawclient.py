"""A deliberately small blocking RFB 3.8 client (None auth, Raw) for server-behaviour tests.

Real clients (vncdotool, noVNC, TigerVNC) prove interoperability; this one exists to do what real
clients will not: stop reading, send garbage, hold a request open and time the answer.
"""

from __future__ import annotations

import socket
import struct

import numpy as np

RAW, COPYRECT, ZRLE, DESKTOP_SIZE, EXT_DESKTOP_SIZE, LAST_RECT = 0, 1, 16, -223, -308, -224


class RawClient:
    def __init__(self, host: str, port: int, *, shared: bool = True, timeout: float = 5.0,
                 encodings: tuple[int, ...] = (RAW, COPYRECT, DESKTOP_SIZE, EXT_DESKTOP_SIZE),
                 rcvbuf: int | None = None) -> None:
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        assert self.recv(12) == b"RFB 003.008\n"
        self.sock.sendall(b"RFB 003.008\n")
        n = self.recv(1)[0]
        types = self.recv(n)
        assert 1 in types, f"server offers {list(types)}, not None"
        self.sock.sendall(b"\x01")
        assert self.recv(4) == b"\0\0\0\0"
        self.sock.sendall(bytes([int(shared)]))
        self.width, self.height = struct.unpack(">HH", self.recv(4))
        self.recv(16)  # pixel format: we keep the server's (native 32bpp LE BGRX)
        self.name = self.recv(struct.unpack(">I", self.recv(4))[0])
        self.fb = np.zeros((self.height, self.width), np.uint32)
        self.zrle_rects: list[bytes] = []
        self.set_encodings(encodings)

    def set_encodings(self, encodings: tuple[int, ...]) -> None:
        self.sock.sendall(struct.pack(">BxH", 2, len(encodings))
                          + b"".join(struct.pack(">i", e) for e in encodings))

    def recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("server closed the connection")
            buf += chunk
        return bytes(buf)

    def request(self, incremental: bool = True) -> None:
        self.sock.sendall(struct.pack(">BBHHHH", 3, int(incremental), 0, 0, self.width,
                                      self.height))

    def key(self, keysym: int, down: bool = True) -> None:
        self.sock.sendall(struct.pack(">BBxxI", 4, int(down), keysym))

    def pointer(self, x: int, y: int, buttons: int = 0) -> None:
        self.sock.sendall(struct.pack(">BBHH", 5, buttons, x, y))

    def read_update(self) -> list[tuple[int, int, int, int, int]]:
        """Read server messages until one FramebufferUpdate is complete; returns its rects."""
        while True:
            mtype = self.recv(1)[0]
            if mtype == 0:
                break
            if mtype == 2:  # bell
                continue
            if mtype == 3:  # server cut text
                self.recv(3)
                self.recv(struct.unpack(">I", self.recv(4))[0])
                continue
            if mtype == 150:  # EndOfContinuousUpdates
                continue
            if mtype == 248:  # fence
                self.recv(3)
                self.recv(4)
                self.recv(self.recv(1)[0])
                continue
            raise AssertionError(f"unexpected server message {mtype}")
        self.recv(1)
        (count,) = struct.unpack(">H", self.recv(2))
        rects = []
        for _ in range(count):
            x, y, w, h, enc = struct.unpack(">HHHHi", self.recv(12))
            rects.append((x, y, w, h, enc))
            if enc == RAW:
                data = self.recv(w * h * 4)
                self.fb[y:y + h, x:x + w] = np.frombuffer(data, "<u4").reshape(h, w)
            elif enc == COPYRECT:
                sx, sy = struct.unpack(">HH", self.recv(4))
                self.fb[y:y + h, x:x + w] = self.fb[sy:sy + h, sx:sx + w].copy()
            elif enc == DESKTOP_SIZE:
                self._resize(w, h)
            elif enc == EXT_DESKTOP_SIZE:
                nscreens = self.recv(4)[0]
                self.recv(16 * nscreens)
                if y == 0:  # status: success
                    self._resize(w, h)
            elif enc == -258:  # QEMU ext key ack: no payload
                pass
            elif enc == ZRLE:  # not decoded here: kept (length-prefixed) for a reference decoder
                n = self.recv(4)
                self.zrle_rects.append(struct.pack(">HHHHi", x, y, w, h, enc) + n
                                       + self.recv(struct.unpack(">I", n)[0]))
            elif enc == LAST_RECT:
                break
            else:
                raise AssertionError(f"unexpected encoding {enc}")
        return rects

    def _resize(self, w: int, h: int) -> None:
        self.width, self.height = w, h
        self.fb = np.zeros((h, w), np.uint32)

    def full_frame(self) -> np.ndarray:
        self.request(incremental=False)
        self.read_update()
        return self.fb

    def wait_for_update(self, timeout: float = 5.0) -> list[tuple[int, int, int, int, int]]:
        self.sock.settimeout(timeout)
        return self.read_update()

    def close(self) -> None:
        self.sock.close()

