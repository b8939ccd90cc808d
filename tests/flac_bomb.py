"""Hand-made FLAC streams that decode to far more audio than their size: decompression bombs.

Every frame holds the largest block FLAC allows (65535 samples per channel) as CONSTANT subframes,
3 bytes per channel, so a 10 MB file decodes to days of multichannel audio. STREAMINFO's sample
count can tell the truth, claim a short clip, or say "unknown" (0), as a hostile file may.
"""

from __future__ import annotations

import itertools

import numpy as np

BLOCK = 65535  # samples per channel in every frame; FLAC's largest block size


def _crc_table(poly: int, width: int) -> np.ndarray:
    top, mask = 1 << (width - 1), (1 << width) - 1
    table = []
    for byte in range(256):
        crc = byte << (width - 8)
        for _ in range(8):
            crc = ((crc << 1) ^ poly) if crc & top else crc << 1
        table.append(crc & mask)
    return np.array(table, dtype=np.uint32)


_CRC8 = _crc_table(0x07, 8)
_CRC16 = _crc_table(0x8005, 16)


def _crc(rows: np.ndarray, table: np.ndarray, width: int) -> np.ndarray:
    """The CRC of each row of a (frames, bytes) uint8 array, all rows at once."""
    crc = np.zeros(len(rows), dtype=np.uint32)
    mask = (1 << width) - 1
    for column in rows.T:
        crc = table[(crc >> (width - 8)) ^ column] ^ ((crc << 8) & mask)
    return crc


def _utf8_frame_numbers(start: int, stop: int) -> np.ndarray:
    """Frame numbers ``start..stop-1`` in FLAC's UTF-8-like coding; all must have the same length."""
    numbers = np.arange(start, stop, dtype=np.uint32)
    if stop <= 0x80:
        return numbers[:, None].astype(np.uint8)
    if stop <= 0x800:
        return np.stack([0xC0 | numbers >> 6, 0x80 | numbers & 0x3F], axis=1).astype(np.uint8)
    if stop <= 0x10000:
        parts = [0xE0 | numbers >> 12, 0x80 | (numbers >> 6) & 0x3F, 0x80 | numbers & 0x3F]
        return np.stack(parts, axis=1).astype(np.uint8)
    parts = [0xF0 | numbers >> 18, 0x80 | (numbers >> 12) & 0x3F, 0x80 | (numbers >> 6) & 0x3F]
    return np.stack([*parts, 0x80 | numbers & 0x3F], axis=1).astype(np.uint8)


def _frames(start: int, stop: int, channels: int, value: int) -> bytes:
    numbers = _utf8_frame_numbers(start, stop)
    n = len(numbers)
    # Sync + fixed block size; block size "16 bit at end" (0111), rate from STREAMINFO (0000);
    # independent channels, 16 bits per sample.
    fixed = np.array([0xFF, 0xF8, 0x70, (channels - 1) << 4 | 0b1000], dtype=np.uint8)
    tail = np.array([(BLOCK - 1) >> 8, (BLOCK - 1) & 0xFF], dtype=np.uint8)
    header = np.concatenate([np.tile(fixed, (n, 1)), numbers, np.tile(tail, (n, 1))], axis=1)
    header = np.concatenate([header, _crc(header, _CRC8, 8)[:, None].astype(np.uint8)], axis=1)
    subframe = [0x00, (value >> 8) & 0xFF, value & 0xFF]  # CONSTANT subframe, no wasted bits
    body = np.tile(np.array(subframe * channels, dtype=np.uint8), (n, 1))
    frame = np.concatenate([header, body], axis=1)
    crc16 = _crc(frame, _CRC16, 16)
    footer = np.stack([crc16 >> 8, crc16 & 0xFF], axis=1).astype(np.uint8)
    return np.concatenate([frame, footer], axis=1).tobytes()


def flac_bomb(
    size_bytes: int,
    sample_rate: int = 192_000,
    channels: int = 8,
    declared_samples: int | None = None,
    value: int = 0,
) -> bytes:
    """A FLAC stream of about ``size_bytes`` whose frames all hold one constant sample ``value``.

    ``declared_samples``: what STREAMINFO claims (None: the truth, 0: unknown)."""
    frame_bytes = 4 + 4 + 2 + 1 + 3 * channels + 2  # upper bound: 4-byte frame numbers
    n_frames = max(1, size_bytes // frame_bytes)
    total = n_frames * BLOCK if declared_samples is None else declared_samples
    streaminfo = bytearray()
    streaminfo += BLOCK.to_bytes(2, "big") * 2
    streaminfo += bytes(6)  # min/max frame size unknown
    packed = sample_rate << 44 | (channels - 1) << 41 | (16 - 1) << 36 | total
    streaminfo += packed.to_bytes(8, "big")
    streaminfo += bytes(16)  # no MD5
    out = [b"fLaC", bytes([0x80, 0, 0, len(streaminfo)]), bytes(streaminfo)]
    edges = [0, 0x80, 0x800, 0x10000, 0x200000]
    for lo, hi in itertools.pairwise(edges):
        if n_frames > lo:
            out.append(_frames(lo, min(hi, n_frames), channels, value))
    return b"".join(out)
