"""The public API is what the README promises, and importing it pulls in nothing but the library."""

from __future__ import annotations

import sys

import pgrepl


def test_readme_imports_work() -> None:
    from pgrepl import Consumer, DeliveryError, Producer, ReplicationOp, TopicInfo  # noqa: F401

    assert issubclass(DeliveryError, pgrepl.PgreplError)


def test_all_lists_exactly_the_public_names() -> None:
    exported = {name for name, value in vars(pgrepl).items()
                if not name.startswith("_") and not isinstance(value, type(sys))}  # submodules aside
    assert exported == set(pgrepl.__all__) - {"__version__"}
    for name in pgrepl.__all__:
        assert getattr(pgrepl, name) is not None, name
    assert {"Producer", "Consumer", "ReplicationOp", "Op", "TopicInfo", "PgreplError", "ConfigError", "DecodeError",
            "ReplicationError", "DeliveryError", "MalformedRecordError", "ConsumerError", "HandlerError",
            "__version__"} <= set(pgrepl.__all__)
