"""MLLP framing (HL7 v2 MLLP release 1): <SB=0x0B> message <EB=0x1C><CR=0x0D>. Pure; in the core
because both the listener (connectors/hl7/mllp.py) and the ORU sender (streams/stages/ehr_hl7.py) frame.

`FrameDecoder.feed(bytes)` returns what the bytes completed, in order:
- `Frame`: one message's bytes;
- `Junk`: bytes outside any frame (line noise, a sender's stray CR/LF, a port
  scanner), dropped: the decoder resyncs on the next 0x0B;
- `Abandoned`: a frame cut short by a new 0x0B (the sender restarted mid-message);
  it was never acknowledged, so the sender still has it and resends it;
- `Oversized`: a frame grew past `max_bytes`; the caller refuses it and closes the
  connection (the rest of such a frame cannot be told from the next message).

An EB is accepted without its CR (some senders omit it); a CR right after an EB is the
frame's own trailer, not junk.
"""

from __future__ import annotations

from dataclasses import dataclass

SB = b"\x0b"
EB = b"\x1c"
CR = b"\x0d"


@dataclass(frozen=True)
class Frame:
    payload: bytes


@dataclass(frozen=True)
class Junk:
    size: int


@dataclass(frozen=True)
class Abandoned:
    size: int


@dataclass(frozen=True)
class Oversized:
    # The frame's first `max_bytes` bytes: enough to read its MSH and quarantine what came.
    prefix: bytes


Item = Frame | Junk | Abandoned | Oversized


def frame(payload: bytes) -> bytes:
    return SB + payload + EB + CR


class FrameDecoder:
    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.max_bytes = max_bytes
        self._buf = bytearray()
        self._in_frame = False
        self._after_eb = False
        # Where the EB search resumes: bytes before it are known not to hold an EB or SB.
        self._scanned = 0
        self.closed = False

    @property
    def pending(self) -> int:
        """Bytes of an unfinished frame held (0 between frames)."""
        return len(self._buf) if self._in_frame else 0

    def feed(self, data: bytes) -> list[Item]:
        if self.closed:
            return []
        out: list[Item] = []
        if self._after_eb and data:
            self._after_eb = False
            if data[:1] == CR:
                data = data[1:]
        self._buf += data
        while self._buf:
            if not self._in_frame:
                start = self._buf.find(SB)
                if start < 0:
                    out.append(Junk(len(self._buf)))
                    self._buf.clear()
                    break
                if start > 0:
                    out.append(Junk(start))
                del self._buf[: start + 1]
                self._in_frame, self._scanned = True, 0
                continue
            end = self._buf.find(EB, self._scanned)
            restart = self._buf.find(SB, self._scanned)
            stop = min(i for i in (end, restart, len(self._buf)) if i >= 0)
            # Oversized is decided on where the frame stops, never on how the bytes were
            # chunked: the same stream gets the same answer however TCP delivered it.
            if stop > self.max_bytes:
                out.append(Oversized(bytes(self._buf[: self.max_bytes])))
                self._close()
                break
            if stop == len(self._buf):
                self._scanned = len(self._buf)
                break
            if stop == restart:
                out.append(Abandoned(restart))
                del self._buf[:restart]
                self._in_frame = False
                continue
            out.append(Frame(bytes(self._buf[:end])))
            del self._buf[: end + 1]
            self._in_frame = False
            if self._buf[:1] == CR:
                del self._buf[:1]
            elif not self._buf:
                self._after_eb = True
        return out

    def _close(self) -> None:
        self.closed = True
        self._buf.clear()
        self._in_frame = False
