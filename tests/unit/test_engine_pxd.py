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


def _declared(pxd: str) -> tuple[str, set[str], dict[str, list[str]]]:
    text = (ENGINE / pxd).read_text()
    (cls,) = re.findall(r"^cdef class (\w+):", text, re.MULTILINE)
    fields = set(re.findall(r"^    cdef public object (\w+)$", text, re.MULTILINE))
    methods = {
        name: [p.strip().split()[-1].split("=")[0] for p in params.split(",")]
        for name, params in re.findall(r"^    cpdef (\w+)\((.*)\)$", text, re.MULTILINE)
    }
    return cls, fields, methods


@pytest.mark.parametrize(
    ("pxd", "module"), [("machine.pxd", machine), ("driver.pxd", driver), ("effects.pxd", effects)]
)
def test_the_declared_fields_are_the_slots(pxd: str, module: object) -> None:
    cls, fields, methods = _declared(pxd)
    source_class = getattr(module, cls)
    slots = source_class.__dict__.get("__slots__")
    if slots is None:  # compiled: the slots became the extension type's fields
        slots = [name for name, value in vars(source_class).items() if inspect.isgetsetdescriptor(value)]
        slots += [name for name, value in vars(source_class).items() if inspect.ismemberdescriptor(value)]
    assert fields == set(slots)
    for name, params in methods.items():
        signature = inspect.signature(getattr(source_class, name))
        assert list(signature.parameters) == params, name
