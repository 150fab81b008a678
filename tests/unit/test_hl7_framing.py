"""MLLP framing and the quarantine: frames in any chunking, junk, restarts, oversized frames."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.hl7.quarantine import Quarantine, sha256_hex
from radtriage.mllp_framing import Abandoned, Frame, FrameDecoder, Item, Junk, Oversized, frame


def feed_all(decoder: FrameDecoder, *chunks: bytes) -> list[Item]:
    out: list[Item] = []
    for chunk in chunks:
        out += decoder.feed(chunk)
    return out


def test_one_frame() -> None:
    assert FrameDecoder(100).feed(frame(b"MSH|x")) == [Frame(b"MSH|x")]


def test_frames_split_and_joined_arbitrarily() -> None:
    stream = frame(b"one") + frame(b"two") + frame(b"three")
    d = FrameDecoder(100)
    items = feed_all(d, *(stream[i : i + 1] for i in range(len(stream))))
    assert items == [Frame(b"one"), Frame(b"two"), Frame(b"three")]
    assert d.pending == 0


def test_junk_between_frames_is_dropped_and_reported() -> None:
    items = FrameDecoder(100).feed(b"\r\nnoise" + frame(b"a") + b"xx" + frame(b"b") + b"\n")
    assert items == [Junk(7), Frame(b"a"), Junk(2), Frame(b"b"), Junk(1)]


def test_cr_after_eb_in_the_next_chunk_is_not_junk() -> None:
    d = FrameDecoder(100)
    assert feed_all(d, b"\x0bA\x1c", b"\r\x0bB\x1c\r") == [Frame(b"A"), Frame(b"B")]


def test_eb_without_cr_ends_a_frame() -> None:
    assert FrameDecoder(100).feed(b"\x0bA\x1c\x0bB\x1c") == [Frame(b"A"), Frame(b"B")]


def test_a_new_start_block_abandons_an_unfinished_frame() -> None:
    d = FrameDecoder(100)
    assert feed_all(d, b"\x0bpartial", b"\x0bwhole\x1c\r") == [Abandoned(7), Frame(b"whole")]


def test_oversized_frame_closes_the_decoder() -> None:
    d = FrameDecoder(10)
    items = feed_all(d, b"\x0b" + b"y" * 6, b"z" * 6)
    assert items == [Oversized(b"yyyyyyzzzz")]
    assert d.closed
    assert d.feed(frame(b"late")) == []
    # Complete but too large in one chunk: refused too.
    assert FrameDecoder(3).feed(frame(b"abcd")) == [Oversized(b"abc")]
    # Exactly the limit is fine.
    assert FrameDecoder(4).feed(frame(b"abcd")) == [Frame(b"abcd")]


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(
    payloads=st.lists(
        st.binary(max_size=40).map(lambda b: b.replace(b"\x0b", b"").replace(b"\x1c", b"")), max_size=6
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=10),
)
def test_any_chunking_yields_the_same_frames(payloads: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(frame(p) for p in payloads)
    points = sorted({c for c in cuts if c < len(stream)} | {0, len(stream)})
    chunks = [stream[a:b] for a, b in itertools.pairwise(points)]
    items = feed_all(FrameDecoder(1000), *chunks)
    assert items == [Frame(p) for p in payloads]


def test_quarantine_is_content_addressed_atomic_and_idempotent(tmp_path: Path) -> None:
    q = Quarantine(tmp_path / "quarantine" / "hl7")
    data = b"MSH|^~\\&|raw bytes\r"
    digest, uri = q.put(data)
    assert digest == sha256_hex(data)
    path = tmp_path / "quarantine" / "hl7" / f"{digest}.hl7"
    assert uri == path.resolve().as_uri()
    assert path.read_bytes() == data
    assert q.put(data) == (digest, uri)
    assert os.listdir(path.parent) == [path.name]  # no temp files left behind


def test_an_unfinished_frame_past_the_limit_is_oversized_even_if_a_restart_follows() -> None:
    stream = b"\x0b" + b"u" * 20 + frame(b"next")
    assert FrameDecoder(10).feed(stream) == [Oversized(b"u" * 10)]
    assert feed_all(FrameDecoder(10), stream[:15], stream[15:]) == [Oversized(b"u" * 10)]


def _merge_junk(items: list[Item]) -> list[Item]:
    # Junk is reported per feed; how much arrives per feed is TCP's business.
    out: list[Item] = []
    for item in items:
        if isinstance(item, Junk) and out and isinstance(out[-1], Junk):
            out[-1] = Junk(out[-1].size + item.size)
        else:
            out.append(item)
    return out


@settings(max_examples=500, deadline=None, derandomize=True, database=None)
@given(
    stream=st.lists(st.sampled_from([b"\x0b", b"\x1c", b"\r", b"a", b"MSH|", b"zz" * 5]), max_size=40).map(
        b"".join
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=8),
    limit=st.integers(min_value=1, max_value=30),
)
def test_chunking_never_changes_the_outcome(stream: bytes, cuts: list[int], limit: int) -> None:
    points = sorted({c for c in cuts if c < len(stream)} | {0, len(stream)})
    chunked = feed_all(FrameDecoder(limit), *(stream[a:b] for a, b in itertools.pairwise(points)))
    whole = FrameDecoder(limit).feed(stream)
    assert _merge_junk(chunked) == _merge_junk(whole)
