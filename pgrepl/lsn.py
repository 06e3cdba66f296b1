"""PostgreSQL LSNs: conversion between the ``XXX/XXX`` text form and unsigned 64-bit integers."""

from __future__ import annotations

import re

from pgrepl.errors import ConfigError

_LSN_TEXT = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")


def parse_lsn(text: str) -> int:
    """Turn PostgreSQL's ``hi/lo`` hexadecimal LSN text into an integer."""
    match = _LSN_TEXT.match(text.strip())
    if match is None:
        raise ConfigError(f"not an LSN: {text!r}; expected the form '16/B374D848'")
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


def format_lsn(lsn: int) -> str:
    """Turn an integer LSN into PostgreSQL's ``hi/lo`` text form."""
    if not 0 <= lsn < 1 << 64:
        raise ValueError(f"LSN out of range: {lsn}")
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"
