"""An MLLP receiver of our own, as a RIS/EHR would be: it reads framed HL7 v2 messages,
keeps each one, and answers with python-hl7's ACK (an implementation independent of
radtriage's), AA or AE with a reason as the test's policy says, or not at all.

A thread per connection (socketserver), so both plain and asyncio tests can use it.
"""

from __future__ import annotations

import socket
import socketserver
import ssl
import threading
from collections.abc import Callable
from types import TracebackType

import hl7

from radtriage.mllp_framing import Frame, FrameDecoder, frame

# (ACK code, reason for MSA-3 / ERR-8), or None: read the message and never answer.
Policy = Callable[[str], tuple[str, str] | None]


def always_aa(message: str) -> tuple[str, str]:
    return "AA", ""


def ack_for(message: str, code: str, reason: str) -> bytes:
    ack = hl7.parse(message).create_ack(
        code, message_id=f"ACK{len(message)}", application="RIS", facility="HOSP"
    )
    text = str(ack)
    if reason:
        text += f"|{reason}\rERR||||E||||{reason}"
    return text.encode("utf-8")


class MllpReceiver:
    def __init__(self, policy: Policy = always_aa, port: int = 0, tls: ssl.SSLContext | None = None) -> None:
        self.policy = policy
        self.messages: list[str] = []
        self.connections = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                with receiver._lock:
                    receiver.connections += 1
                decoder = FrameDecoder(1 << 20)
                while True:
                    try:
                        data = self.request.recv(65536)
                    except (ssl.SSLError, OSError):
                        return  # a client our CA did not sign, or one that left mid-handshake
                    if not data:
                        return
                    for item in decoder.feed(data):
                        if not isinstance(item, Frame):
                            continue
                        message = item.payload.decode("utf-8")
                        with receiver._lock:
                            receiver.messages.append(message)
                        answer = receiver.policy(message)
                        if answer is not None:
                            self.request.sendall(frame(ack_for(message, *answer)))

        class Server(socketserver.ThreadingTCPServer):
            allow_reuse_address = True  # a port a test picked and released just before
            daemon_threads = True

            def get_request(self) -> tuple[socket.socket, object]:
                sock, address = self.socket.accept()
                if tls is None:
                    return sock, address
                # The handshake happens in the handler's thread, on its first read.
                return tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address

        self._server = Server(("127.0.0.1", port), Handler)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> MllpReceiver:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.shutdown()
        self._server.server_close()

    def received(self) -> list[str]:
        with self._lock:
            return list(self.messages)
