"""The delta frame format: the compiled encoder lists exactly the differing bytes as a plain
Python encoder of the format does (pieces at odd offsets, every varint length, nothing or
everything changed), the decoder rebuilds the new bytes, and pairs that do not fit a frame
are refused, never written outside it."""

from __future__ import annotations

import numpy as np
import pytest
import zstandard

from simko_tune.generation.xor_codec import apply_frame, encode_into, pairs_bound


def _leb128(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 127, n >> 7
        out.append(byte | (128 if n else 0))
        if not n:
            return bytes(out)


def _plain_encode(old: np.ndarray, new: np.ndarray) -> bytes:
    out, last = bytearray(), 0
    for p in range(len(old)):
        if old[p] != new[p]:
            out += _leb128(p - last) + bytes([int(old[p]) ^ int(new[p])])
            last = p
    return bytes(out)


def _encode(old: np.ndarray, new: np.ndarray, cuts: list[int]) -> tuple[bytes, np.ndarray]:
    """Through ``encode_into``, the frame given in pieces split at ``cuts`` (each piece a
    view at an odd offset of a bigger array, as a shard's tensors are)."""
    padded = np.zeros(new.size + 3, dtype=np.uint8)
    padded[3:] = new
    new_view, base = padded[3:], old.copy()
    out = np.zeros(pairs_bound(new.size), dtype=np.uint8)
    k, last = 0, 0
    bounds = [0, *cuts, new.size]
    for lo, hi in zip(bounds, bounds[1:]):
        k, last = encode_into(new_view[lo:hi], base[lo:hi], out, k, lo, last)
    return out[:k].tobytes(), base


CASES = {
    "empty": (0, []),
    "one byte": (1, [0]),
    "nothing changed": (1000, []),
    "everything changed": (1001, list(range(1001))),  # the worst case: 2 bytes per byte
    "sparse, every varint length": (70_000, [0, 5, 127, 128, 300, 16_700, 16_701, 69_999]),
    "a tail after the last word": (13, [8, 9, 12]),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("cuts", [[], [1, 7, 8, 9]], ids=["whole", "pieces"])
def test_the_encoder_lists_the_differing_bytes_as_the_plain_encoder(case, cuts):
    size, changed = CASES[case]
    rng = np.random.default_rng(len(changed))
    old = rng.integers(0, 256, size, dtype=np.uint8)
    new = old.copy()
    new[changed] ^= rng.integers(1, 256, len(changed), dtype=np.uint8)  # never 0: a change
    pairs, base = _encode(old, new, [c for c in cuts if c < size])
    assert pairs == _plain_encode(old, new)
    assert len(pairs) <= pairs_bound(size)
    assert np.array_equal(base, new)  # the base now holds the new bytes
    rebuilt = old.copy()
    apply_frame(zstandard.ZstdCompressor(level=1).compress(pairs), rebuilt)
    assert np.array_equal(rebuilt, new)


def test_random_frames_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(50):
        size = int(rng.integers(1, 5000))
        old = rng.integers(0, 256, size, dtype=np.uint8)
        new = old.copy()
        mask = rng.random(size) < rng.choice([0.001, 0.03, 0.5])
        new[mask] = rng.integers(0, 256, int(mask.sum()), dtype=np.uint8)
        cuts = sorted(int(c) for c in rng.integers(0, size, 3))
        pairs, base = _encode(old, new, cuts)
        assert pairs == _plain_encode(old, new) and np.array_equal(base, new)
        rebuilt = old.copy()
        apply_frame(zstandard.ZstdCompressor(level=1).compress(pairs), rebuilt)
        assert np.array_equal(rebuilt, new)


def test_a_too_small_buffer_is_an_error_not_an_overflow():
    old, new = np.zeros(100, np.uint8), np.ones(100, np.uint8)
    with pytest.raises(RuntimeError, match="overflow"):
        encode_into(new, old.copy(), np.zeros(50, np.uint8), 0, 0, 0)


BAD_PAIRS = {
    "past the end": _leb128(10) + b"\x01",
    "past the end after a gap": _leb128(5) + b"\x01" + _leb128(5) + b"\x01",
    "a cut varint": b"\x81",
    "a gap without its byte": _leb128(3),
    "a varint longer than any position": b"\xff" * 6 + b"\x01\x01",
}


@pytest.mark.parametrize("bad", BAD_PAIRS)
def test_pairs_that_do_not_fit_the_frame_are_refused(bad):
    guard = np.zeros(30, dtype=np.uint8)
    out = guard[10:20]  # a frame of 10 bytes inside a bigger buffer
    with pytest.raises(ValueError, match="do not fit a frame of 10 bytes"):
        apply_frame(zstandard.ZstdCompressor().compress(BAD_PAIRS[bad]), out)
    assert not guard[:10].any() and not guard[20:].any()  # nothing written outside it


def test_a_frame_that_is_not_zstd_or_too_big_is_refused():
    with pytest.raises(ValueError, match="not a zstd frame"):
        apply_frame(b"\x00" * 20, np.zeros(10, np.uint8))
    too_big = zstandard.ZstdCompressor().compress(b"\x01" * (pairs_bound(10) + 1))
    with pytest.raises(ValueError, match="pair bytes, for a frame of 10 bytes"):
        apply_frame(too_big, np.zeros(10, np.uint8))
