"""The producer's glibc malloc settings: applied once, and never over an operator's own choice."""

from __future__ import annotations

import sys

import pytest

from pgrepl.producer import memory


@pytest.mark.parametrize("environ, reason", [
    ({"PGREPL_MALLOC_TUNING": "off"}, "PGREPL_MALLOC_TUNING is off"),
    ({"PGREPL_MALLOC_TUNING": "0"}, "PGREPL_MALLOC_TUNING is off"),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1048576"}, "GLIBC_TUNABLES sets malloc tunables"),
    ({"MALLOC_TRIM_THRESHOLD_": "1048576"}, "MALLOC_TRIM_THRESHOLD_ is set"),
    ({"MALLOC_MMAP_THRESHOLD_": "1048576"}, "MALLOC_MMAP_THRESHOLD_ is set"),
])
def test_an_operators_choice_is_left_alone(environ: dict, reason: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "_applied", False)
    assert memory._operator_choice(environ) == reason
    assert memory.tune_malloc(environ) is False


def test_no_choice_made_means_tuning() -> None:
    assert memory._operator_choice({"GLIBC_TUNABLES": "glibc.pthread.rseq=0", "PGREPL_MALLOC_TUNING": "on"}) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_applied_on_glibc_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import ctypes

    if not hasattr(ctypes.CDLL(None), "gnu_get_libc_version"):
        pytest.skip("not glibc")
    monkeypatch.setattr(memory, "_applied", False)
    assert memory.tune_malloc({}) is True
    assert memory.tune_malloc({"PGREPL_MALLOC_TUNING": "off"}) is True  # already in force for the process
