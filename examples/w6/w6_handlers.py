"""Handlers of the standard benchmark workload W6 (DESIGN.md section 10): trivial on purpose."""


def inc(inputs: dict) -> dict:
    return {"x": inputs["x"] + 1}


def double(inputs: dict) -> dict:
    return {"x": inputs["x"] * 2}


def triple(inputs: dict) -> dict:
    return {"x": inputs["x"] * 3}


def total(inputs: dict) -> dict:
    return {"x": inputs["a"] + inputs["b"]}
