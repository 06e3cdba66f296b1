"""The compiled module's stub (pgrepl/_core/core.pyi) names everything the module exports, and nothing else."""

from __future__ import annotations

import ast
from pathlib import Path

import pgrepl._core.core as core

STUB = Path(core.__file__).with_name("core.pyi")


def _stub_names() -> dict:
    tree = ast.parse(STUB.read_text())
    names: dict = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            members = {n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))} | {
                n.target.id for n in node.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
            names[node.name] = members if isinstance(node, ast.ClassDef) else None
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = None
        elif isinstance(node, ast.Assign):
            names.update({t.id: None for t in node.targets if isinstance(t, ast.Name)})
    return names


def test_the_stub_lists_every_public_name_of_the_compiled_module() -> None:
    stub = _stub_names()
    public = {name for name, value in vars(core).items()  # defined here, not imported into it
              if not name.startswith("_") and getattr(value, "__module__", None) == core.__name__}
    assert {"Decoder", "ReplicationStream", "parse_canonical", "copy_out"} <= public  # the filter sees the module
    assert public - set(stub) == set(), "exported by the module but missing from core.pyi"
    assert {n for n in stub if not n.startswith("_")} - set(vars(core)) == set(), "in core.pyi but not in the module"


def test_the_stub_lists_every_public_method_of_its_classes() -> None:
    for name, members in _stub_names().items():
        cls = getattr(core, name, None)
        if members is None or not isinstance(cls, type):
            continue
        public = {m for m in vars(cls) if not m.startswith("_")}
        assert public - members == set(), f"{name}: methods missing from core.pyi"
