"""A rule group name that puts promtool's recording-rule evaluations on a chosen time grid.

`promtool tsdb create-blocks-from rules` evaluates a group when a running Prometheus would:
at offset + k * interval, where the offset is the xxHash64 of the group's name and file
modulo the interval (rules.Group.EvalTimestamp in 2.42). The name chosen here makes that offset
the one asked for, so recorded samples land exactly where the alerts are later evaluated.
Exactly, to the nanosecond: promtool skips an evaluation that falls a fraction of a second
before one of its block boundaries.
"""

from __future__ import annotations

from typing import Final

# The file name promtool is given (as a relative path: the hash takes it as written).
RULES_FILE: Final = "r.yml"

_MASK: Final = (1 << 64) - 1
_P1: Final = 11400714785074694791
_P2: Final = 14029467366897019727
_P3: Final = 1609587929392839161
_P4: Final = 9650029242287828579
_P5: Final = 2870177450012600261
_INV_P1: Final = pow(_P1, -1, 1 << 64)
_INV_P2: Final = pow(_P2, -1, 1 << 64)
_INV_P3: Final = pow(_P3, -1, 1 << 64)

# labels.Labels{file, name}.Hash() hashes b"file\xff<file>\xffname\xff<name>\xff". A 5-byte
# file name makes the bytes before the name two whole 8-byte lanes, and an 8-byte name the
# third: the one lane solved for, backwards from the hash wanted.
_PREFIX: Final = b"file\xff" + RULES_FILE.encode() + b"\xffname\xff"
_NAME_LENGTH: Final = 8
_SUFFIX: Final = b"\xff"
_HASHED_LENGTH: Final = len(_PREFIX) + _NAME_LENGTH + len(_SUFFIX)
_PRINTABLE: Final = range(0x21, 0x7F)


def group_name_for_offset(offset_ns: int, interval_ns: int) -> str:
    """A group name (in RULES_FILE) that promtool evaluates at offset_ns + k * interval_ns."""
    target = offset_ns % interval_ns
    # Every hash with this remainder gives the offset; most decode to unprintable bytes, and
    # about one in 3,000 to a printable name.
    for multiple in range(((1 << 64) - 1 - target) // interval_ns + 1):
        name = _name_with_hash(target + multiple * interval_ns)
        if name is not None:
            if group_offset_ns(name, interval_ns) != target:
                raise RuntimeError(f"group name {name!r} does not hash as solved")
            return name
    raise ValueError(f"no printable group name has offset {target} ns in {interval_ns} ns")


def group_offset_ns(name: str, interval_ns: int) -> int:
    """The offset of a group `name` in RULES_FILE, as rules.Group.EvalTimestamp computes it."""
    return xxhash64(_PREFIX + name.encode() + _SUFFIX) % interval_ns


def xxhash64(data: bytes) -> int:
    """XXH64 with seed 0, as github.com/cespare/xxhash's Sum64."""
    state, offset = (_P5 + len(data)) & _MASK, 0
    if len(data) >= 32:
        state, offset = _stripes(data)
    while len(data) - offset >= 8:
        state = _mix_lane(state, _lane(data, offset))
        offset += 8
    if len(data) - offset >= 4:
        word = int.from_bytes(data[offset : offset + 4], "little")
        state = (_rotl(state ^ (word * _P1 & _MASK), 23) * _P2 + _P3) & _MASK
        offset += 4
    for byte in data[offset:]:
        state = _mix_byte(state, byte)
    return _avalanche(state)


def _stripes(data: bytes) -> tuple[int, int]:
    accs = [(_P1 + _P2) & _MASK, _P2, 0, (-_P1) & _MASK]
    end = len(data) // 32 * 32
    for stripe in range(0, end, 32):
        accs = [_round(acc, _lane(data, stripe + 8 * i)) for i, acc in enumerate(accs)]
    state = sum(_rotl(acc, bits) for acc, bits in zip(accs, (1, 7, 12, 18), strict=True))
    for acc in accs:
        state = ((state & _MASK ^ _round(0, acc)) * _P1 + _P4) & _MASK
    return (state + len(data)) & _MASK, end


def _name_with_hash(digest: int) -> str | None:
    state = _undo_avalanche(digest)
    state = _rotr(state * _INV_P1 & _MASK, 11) ^ (_SUFFIX[0] * _P5 & _MASK)
    mixed_lane = _rotr((state - _P4) * _INV_P1 & _MASK, 27) ^ _STATE_BEFORE_NAME
    lane = _rotr(mixed_lane * _INV_P1 & _MASK, 31) * _INV_P2 & _MASK
    name = lane.to_bytes(_NAME_LENGTH, "little")
    return name.decode("ascii") if all(byte in _PRINTABLE for byte in name) else None


def _lane(data: bytes, offset: int) -> int:
    return int.from_bytes(data[offset : offset + 8], "little")


def _round(acc: int, lane: int) -> int:
    return _rotl((acc + lane * _P2) & _MASK, 31) * _P1 & _MASK


def _mix_lane(state: int, lane: int) -> int:
    return (_rotl(state ^ _round(0, lane), 27) * _P1 + _P4) & _MASK


def _mix_byte(state: int, byte: int) -> int:
    return _rotl(state ^ (byte * _P5 & _MASK), 11) * _P1 & _MASK


def _avalanche(state: int) -> int:
    state = (state ^ state >> 33) * _P2 & _MASK
    state = (state ^ state >> 29) * _P3 & _MASK
    return state ^ state >> 32


def _undo_avalanche(digest: int) -> int:
    state = digest ^ digest >> 32
    state = _undo_xorshift(state * _INV_P3 & _MASK, 29)
    return _undo_xorshift(state * _INV_P2 & _MASK, 33)


def _undo_xorshift(value: int, shift: int) -> int:
    result = value
    for _ in range(64 // shift):
        result = value ^ result >> shift
    return result


def _rotl(value: int, bits: int) -> int:
    return (value << bits | value >> (64 - bits)) & _MASK


def _rotr(value: int, bits: int) -> int:
    return _rotl(value, 64 - bits)


_STATE_BEFORE_NAME: Final = _mix_lane(
    _mix_lane((_P5 + _HASHED_LENGTH) & _MASK, _lane(_PREFIX, 0)), _lane(_PREFIX, 8)
)
