"""Every model the pipeline serves, from its folder: `models/<name>/spec.py` holds `SPEC`
(models/spec.py; docs/ARCHITECTURE.md, Models).

Adding a model is adding its folder: the schemas take its finding code, the inference
stage its input and post-processors, the report its words and codes, the escalate stage
its alert channel, all from here. Specs outside `models/` (a deployment's own, or a test's)
are named by module in RADTRIAGE_MODEL_SPECS (comma-separated, each module with a `SPEC`),
or registered in-process with `register`.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import pkgutil
from collections.abc import Iterator
from contextlib import contextmanager

import models
from models.spec import ModelSpec

EXTRA_SPECS_ENV = "RADTRIAGE_MODEL_SPECS"
_added: dict[str, ModelSpec] = {}


class UnknownModelError(KeyError):
    """A name or finding code no registered model has."""

    def __str__(self) -> str:
        return str(self.args[0])


def _spec_of(module_name: str) -> ModelSpec:
    spec = getattr(importlib.import_module(module_name), "SPEC", None)
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"{module_name} has no SPEC (a models.spec.ModelSpec)")
    return spec


@functools.cache
def _discovered() -> tuple[ModelSpec, ...]:
    found = [
        _spec_of(f"models.{info.name}.spec")
        for info in sorted(pkgutil.iter_modules(models.__path__), key=lambda i: i.name)
        if info.ispkg and importlib.util.find_spec(f"models.{info.name}.spec") is not None
    ]
    extra = [m.strip() for m in os.environ.get(EXTRA_SPECS_ENV, "").split(",") if m.strip()]
    return (*found, *(_spec_of(m) for m in extra))


def specs() -> dict[str, ModelSpec]:
    """Every registered model by its Triton name (a copy: the caller may keep or change it)."""
    return dict(_all())


@functools.cache
def _all() -> dict[str, ModelSpec]:
    # Cached: every decoded finding validates its code against it, and the preprocess pool
    # sizes each request by its model; `register`, `unregister` and `reload` clear it.
    out: dict[str, ModelSpec] = {}
    for spec in (*_discovered(), *_added.values()):
        _check_new(out, spec)
        out[spec.name] = spec
    return out


def _check_new(known: dict[str, ModelSpec], spec: ModelSpec) -> None:
    if spec.name in known and known[spec.name] != spec:
        raise ValueError(f"two specs for model {spec.name}")
    clash = [s.name for s in known.values() if s.finding == spec.finding and s.name != spec.name]
    if clash:
        raise ValueError(f"models {clash[0]} and {spec.name} both report finding {spec.finding}")


def get(name: str) -> ModelSpec:
    try:
        return _all()[name]
    except KeyError:
        raise UnknownModelError(
            f"no model '{name}' is registered (known: {', '.join(sorted(specs()))})"
        ) from None


def for_finding(code: str) -> ModelSpec:
    for spec in _all().values():
        if spec.finding == code:
            return spec
    raise UnknownModelError(f"no registered model reports finding '{code}'")


def finding_codes() -> frozenset[str]:
    return _finding_codes()


@functools.cache
def _finding_codes() -> frozenset[str]:
    return frozenset(s.finding for s in _all().values())


def alert_channels() -> tuple[str, ...]:
    """The alert channels of every model that alerts, sorted (each a topic of its own)."""
    return tuple(sorted({s.alert for s in _all().values() if s.alert is not None}))


def register(spec: ModelSpec) -> None:
    """Add a model in this process (a test's, or a plug-in's)."""
    _check_new(_all(), spec)
    _added[spec.name] = spec
    _changed()


def unregister(name: str) -> None:
    _added.pop(name, None)
    _changed()


def _changed() -> None:
    _all.cache_clear()
    _finding_codes.cache_clear()


@contextmanager
def registered(spec: ModelSpec) -> Iterator[ModelSpec]:
    register(spec)
    try:
        yield spec
    finally:
        unregister(spec.name)


def reload() -> None:
    """Discover the specs again (after RADTRIAGE_MODEL_SPECS changed, in a test)."""
    _discovered.cache_clear()
    _changed()
