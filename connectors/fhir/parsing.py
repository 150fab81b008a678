"""From request bytes to a validated FHIR resource, or a 400 saying exactly why not (pure).

FHIR R4 http.html, create: 400 when the resource "could not be parsed or failed basic
FHIR validation rules" — bad JSON, wrong structure or datatypes (fhir.resources R4B),
a code outside a required binding, or a resourceType the URL does not take. Business
rules (an order without an accession number) are 422, in mapping.py.

Everything here must survive any input: deep nesting, huge numbers, invalid UTF-8,
NaN, and whatever fhir.resources itself raises on odd input (it is not always a
ValidationError) all end in a FhirError, never in an unexpected exception.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.servicerequest import ServiceRequest
from fhir_core.fhirabstractmodel import FHIRAbstractModel
from pydantic import ValidationError

from connectors.fhir.outcome import FhirError, Issue, error

# The resource types this intake creates; everything else is 404 (FHIR http: "resource
# type not supported").
SUPPORTED_TYPES: dict[str, type[FHIRAbstractModel]] = {
    "ServiceRequest": ServiceRequest,
    "ImagingStudy": ImagingStudy,
}

# Required bindings of the fields we read (R4): fhir.resources checks a code's syntax,
# not its value set, and an unknown code here would silently change the routing.
REQUIRED_CODES: dict[str, dict[str, frozenset[str]]] = {
    "ServiceRequest": {
        "status": frozenset(
            {"draft", "active", "on-hold", "revoked", "completed", "entered-in-error", "unknown"}
        ),
        "intent": frozenset(
            {
                "proposal",
                "plan",
                "directive",
                "order",
                "original-order",
                "reflex-order",
                "filler-order",
                "instance-order",
                "option",
            }
        ),
        "priority": frozenset({"routine", "urgent", "asap", "stat"}),
    },
    "ImagingStudy": {
        "status": frozenset({"registered", "available", "cancelled", "entered-in-error", "unknown"}),
    },
}

# No FHIR resource we take nests anywhere near this deep; Python's JSON decoder and
# pydantic recurse, so a hostile document is refused before it reaches either.
MAX_DEPTH = 64


def _reject_constant(name: str) -> float:
    # json accepts NaN/Infinity by default; JSON (RFC 8259) and FHIR do not.
    raise ValueError(f"{name} is not valid JSON")


def json_depth_exceeds(value: Any, limit: int = MAX_DEPTH) -> bool:
    """True if `value` nests objects/arrays deeper than `limit` (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _raw_depth_exceeds(text: str, limit: int = MAX_DEPTH) -> bool:
    """A cheap pre-check on the text (brackets outside strings), so the recursive decoder
    never sees a document that would exhaust the stack."""
    depth = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return True
        elif ch in "]}":
            depth -= 1
    return False


def parse_json(body: bytes) -> Any:
    """The JSON document in `body`, or a 400 FhirError (code structure) saying why not."""
    if not body.strip():
        raise error(400, "structure", "empty request body: expected a FHIR resource in JSON")
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(400, "structure", f"request body is not UTF-8 (byte {exc.start})") from None
    if _raw_depth_exceeds(text):
        raise error(400, "structure", f"JSON nested deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise error(
            400, "structure", f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except (ValueError, RecursionError) as exc:  # huge integers, NaN, pathological input
        raise error(400, "structure", f"invalid JSON: {exc}") from None


def _expression(resource_type: str, loc: Sequence[int | str], prefix: str) -> str:
    path = prefix or resource_type
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part == "resource_type":  # fhir.resources' name for resourceType
            path += ".resourceType"
        else:
            path += f".{str(part).removesuffix('__ext')}"
    return path


def _issues_from(exc: ValidationError, resource_type: str, prefix: str) -> list[Issue]:
    issues: list[Issue] = []
    for err in exc.errors(include_input=False, include_url=False):
        where = _expression(resource_type, err.get("loc", ()), prefix)
        code = "required" if "missing" in err.get("type", "") else "structure"
        # pydantic's messages describe the rule, not the input value; fhir.resources'
        # own messages are multi-line, so collapse the whitespace.
        message = " ".join(str(err.get("msg", "invalid value")).split())
        issues.append(Issue(code, f"{where}: {message}", (where,)))
    return issues or [Issue("structure", f"{prefix or resource_type} is not a valid {resource_type}")]


def validate_resource(data: Any, expected_type: str, *, prefix: str = "") -> FHIRAbstractModel:
    """`data` as a validated R4B `expected_type`, or a 400 FhirError naming each problem.

    `prefix` is the FHIRPath of `data` inside its request (e.g. `Bundle.entry[2].resource`),
    so the OperationOutcome's expressions point at the offending element.
    """
    where = prefix or expected_type
    if not isinstance(data, Mapping):
        raise error(400, "structure", f"{where}: expected a JSON object (a FHIR resource)", where)
    resource_type = data.get("resourceType")
    if resource_type != expected_type:
        got = "no resourceType" if resource_type is None else f"resourceType {str(resource_type)[:64]!r}"
        raise error(
            400,
            "invalid",
            f"{where}: expected resourceType '{expected_type}', got {got}",
            f"{where}.resourceType",
        )
    model = SUPPORTED_TYPES[expected_type]
    if json_depth_exceeds(data):
        raise error(400, "structure", f"{where}: nested deeper than {MAX_DEPTH} levels", where)
    try:
        resource = model.model_validate(data)
    except ValidationError as exc:
        raise FhirError(400, _issues_from(exc, expected_type, prefix)) from None
    except Exception as exc:  # fhir.resources raises KeyError/TypeError/... on odd input
        raise error(
            400, "structure", f"{where} is not a valid {expected_type} ({type(exc).__name__})", where
        ) from None
    _check_required_codes(data, expected_type, where)
    return resource


def _check_required_codes(data: Mapping[str, Any], resource_type: str, where: str) -> None:
    issues = []
    for name, allowed in REQUIRED_CODES.get(resource_type, {}).items():
        value = data.get(name)
        if value is not None and value not in allowed:
            issues.append(
                Issue(
                    "code-invalid",
                    f"{where}.{name}: {str(value)[:64]!r} is not one of {', '.join(sorted(allowed))}",
                    (f"{where}.{name}",),
                )
            )
    if issues:
        raise FhirError(400, issues)
