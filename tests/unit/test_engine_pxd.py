"""The .pxd files beside machine.py and driver.py declare, for the compiled build, exactly what the source defines:
a field the source assigns but the .pxd lacks would fail only at run time in the compiled form, and a declared
method whose parameters differ would not compile."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from aobd.engine import driver, effects, machine

ENGINE = Path(machine.__file__).parent


def _declared(pxd: str) -> list[tuple[str, set[str], dict[str, list[str]]]]:
    """Each ``cdef class`` of a .pxd: its name, its fields and its cpdef methods' parameter names."""
    text = (ENGINE / pxd).read_text()
    classes = []
    for block in re.split(r"^(?=cdef class )", text, flags=re.MULTILINE)[1:]:
        (cls,) = re.findall(r"^cdef class (\w+):", block, re.MULTILINE)
        fields = set(re.findall(r"^    cdef public object (\w+)$", block, re.MULTILINE))
        methods = {
            name: [p.strip().split()[-1].split("=")[0] for p in params.split(",")]
            for name, params in re.findall(r"^    cpdef (\w+)\((.*)\)$", block, re.MULTILINE)
        }
        classes.append((cls, fields, methods))
    return classes


@pytest.mark.parametrize(
    ("pxd", "module"), [("machine.pxd", machine), ("driver.pxd", driver), ("effects.pxd", effects)]
)
def test_the_declared_fields_are_the_slots(pxd: str, module: object) -> None:
    declared = _declared(pxd)
    assert declared, f"{pxd} declares no class"
    for cls, fields, methods in declared:
        source_class = getattr(module, cls)
        slots = source_class.__dict__.get("__slots__")
        if slots is None:  # compiled: the slots became the extension type's fields
            slots = [name for name, value in vars(source_class).items() if inspect.isgetsetdescriptor(value)]
            slots += [name for name, value in vars(source_class).items() if inspect.ismemberdescriptor(value)]
        assert fields == set(slots), cls
        for name, params in methods.items():
            signature = inspect.signature(getattr(source_class, name))
            assert list(signature.parameters) == params, f"{cls}.{name}"
