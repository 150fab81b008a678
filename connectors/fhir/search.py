"""FHIR search on the results view: the parameters, a query string -> `Query`, and the
searchset Bundle (pure).

What is searchable is declared once, in `PARAMETERS`: how each parameter's values are
read off a resource (for the index, connectors/fhir/results_index.py) and what the
CapabilityStatement says of it (connectors/fhir/capability.py). Token parameters are
indexed as (parameter, system, value) keys, with "any system" and "any value" variants,
so every token form FHIR allows — `value`, `system|value`, `|value` (no system),
`system|` — is one dictionary lookup.

Per FHIR R4 (search.html): parameters repeated are ANDed, comma-separated values ORed;
unknown parameters are ignored unless the client sent `Prefer: handling=strict` (then
400), and the self link shows only what was applied; an unsupported modifier or a value
that cannot be parsed is always a 400.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Literal
from urllib.parse import urlencode

# The "any system" / "any value" halves of a token key (cannot occur in JSON text values).
ANY = "\x00"
TokenKey = tuple[str, str, str]  # (parameter, system or ANY, value or ANY)
DIAGNOSTIC_REPORT_STATUS = "http://hl7.org/fhir/diagnostic-report-status"
OBSERVATION_STATUS = "http://hl7.org/fhir/observation-status"
SPEC = "http://hl7.org/fhir/SearchParameter/"
# Result parameters this server honours besides the search parameters.
COUNT, OFFSET, SORT = "_count", "_offset", "_sort"
LAST_UPDATED = "_lastUpdated"
# A deep page costs as much as the pages before it: past this, narrow the search instead.
MAX_OFFSET = 100_000

Extract = Callable[[Mapping[str, Any]], Iterable[tuple[str, str]]]
Reason = Literal["unknown_parameter", "unsupported_modifier", "invalid_value"]


class BadSearch(ValueError):
    """A search refused with 400: `reason` is the metric label, the message tells the client."""

    def __init__(self, reason: Reason, message: str, parameter: str) -> None:
        super().__init__(message)
        self.reason, self.parameter = reason, parameter


# -- reading values off a resource -------------------------------------------------------


def _identifiers(values: Any) -> Iterator[tuple[str, str]]:
    for ident in values if isinstance(values, list) else [values]:
        if isinstance(ident, Mapping) and isinstance(ident.get("value"), str):
            yield str(ident.get("system") or ""), ident["value"]


def _own_identifiers(r: Mapping[str, Any]) -> Iterable[tuple[str, str]]:
    return _identifiers(r.get("identifier") or [])


def _reference_identifiers(element: str) -> Extract:
    """A Reference element's (or a list of them) logical identifiers: `<element>:identifier`."""

    def extract(r: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
        refs = r.get(element) or []
        for ref in refs if isinstance(refs, list) else [refs]:
            if isinstance(ref, Mapping) and ref.get("identifier") is not None:
                yield from _identifiers(ref["identifier"])

    return extract


def _status(system: str) -> Extract:
    def extract(r: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
        if isinstance(r.get("status"), str):
            yield system, r["status"]

    return extract


def _codes(r: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    code = r.get("code")
    for coding in code.get("coding") or [] if isinstance(code, Mapping) else []:
        if isinstance(coding, Mapping) and isinstance(coding.get("code"), str):
            yield str(coding.get("system") or ""), coding["code"]


def _id(r: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    if isinstance(r.get("id"), str):
        yield "", r["id"]


@dataclass(frozen=True)
class Param:
    """One search parameter as clients write it (with its modifier, e.g. `subject:identifier`)."""

    name: str
    type: Literal["token", "reference", "date"]
    definition: str
    documentation: str
    extract: Extract | None = None  # None: not a token (_lastUpdated)

    @property
    def base(self) -> str:
        """The name the CapabilityStatement lists (without the modifier)."""
        return self.name.partition(":")[0]


_COMMON = (
    Param("_id", "token", SPEC + "Resource-id", "The logical id.", _id),
    Param(
        LAST_UPDATED,
        "date",
        SPEC + "Resource-lastUpdated",
        "When the report stage produced this version; prefixes eq, ne, gt, lt, ge, le; "
        "repeat for a range (AND).",
    ),
)


def _by_name(*own: Param) -> dict[str, Param]:
    """A resource type's parameters by name: the common ones, then its own."""
    return {p.name: p for p in (*_COMMON, *own)}


def _status_param(resource_type: str, system: str) -> Param:
    """`status`: the same two values for each type, in the type's own code system."""
    return Param(
        "status",
        "token",
        SPEC + f"{resource_type}-status",
        "preliminary, or amended for a re-read.",
        _status(system),
    )


PARAMETERS: dict[str, dict[str, Param]] = {
    "DiagnosticReport": _by_name(
        Param(
            "identifier",
            "token",
            SPEC + "clinical-identifier",
            "[system|]value: the study (urn:dicom:uid|urn:oid:<StudyInstanceUID>), the accession "
            "number and the filler order number (no system: search them as value or |value).",
            _own_identifiers,
        ),
        Param(
            "subject:identifier",
            "reference",
            SPEC + "clinical-patient",
            "Only with the :identifier modifier: the patient's identifier, [system|]value "
            "(system: the assigning authority).",
            _reference_identifiers("subject"),
        ),
        Param(
            "based-on:identifier",
            "reference",
            SPEC + "DiagnosticReport-based-on",
            "Only with the :identifier modifier: the ServiceRequest's placer/filler order "
            "number or accession number that basedOn carries.",
            _reference_identifiers("basedOn"),
        ),
        _status_param("DiagnosticReport", DIAGNOSTIC_REPORT_STATUS),
        Param("code", "token", SPEC + "clinical-code", "The report's code (LOINC).", _codes),
    ),
    "Observation": _by_name(
        Param(
            "identifier",
            "token",
            SPEC + "clinical-identifier",
            "[system|]value: each Observation's urn:ietf:rfc:3986|urn:uuid:<its id> (the same for "
            "an amended report; what an EHR's server stores it under).",
            _own_identifiers,
        ),
        Param(
            "subject:identifier",
            "reference",
            SPEC + "clinical-patient",
            "Only with the :identifier modifier: the patient's identifier, [system|]value.",
            _reference_identifiers("subject"),
        ),
        Param(
            "derived-from:identifier",
            "reference",
            SPEC + "Observation-derived-from",
            "Only with the :identifier modifier: the ImagingStudy the Observation is derived "
            "from, urn:dicom:uid|urn:oid:<StudyInstanceUID>.",
            _reference_identifiers("derivedFrom"),
        ),
        _status_param("Observation", OBSERVATION_STATUS),
        Param(
            "code",
            "token",
            SPEC + "clinical-code",
            "The finding code (system https://radtriage.dev/fhir/CodeSystem/ai-finding, "
            "a model's finding) or SNOMED CT.",
            _codes,
        ),
    ),
}
SEARCHABLE_TYPES = tuple(PARAMETERS)


def index_keys(resource_type: str, resource: Mapping[str, Any]) -> frozenset[TokenKey]:
    """Every token key `resource` is found under: for each (system, value) of each token
    parameter, the exact key, the any-system key and the any-value key."""
    keys: set[TokenKey] = set()
    for param in PARAMETERS[resource_type].values():
        if param.extract is None:
            continue
        for system, value in param.extract(resource):
            keys.update(((param.name, system, value), (param.name, ANY, value), (param.name, system, ANY)))
    return frozenset(keys)


# -- parsing a query ---------------------------------------------------------------------


@dataclass(frozen=True)
class DateBound:
    """`_lastUpdated=<prefix><value>`: the value is the range [start, end) its precision spans."""

    prefix: str
    start: datetime
    end: datetime

    def admits(self, t: datetime) -> bool:
        match self.prefix:
            case "eq":
                return self.start <= t < self.end
            case "ne":
                return not self.start <= t < self.end
            case "gt":
                return t >= self.end
            case "lt":
                return t < self.start
            case "ge":
                return t >= self.start
            case _:  # le
                return t < self.end


@dataclass(frozen=True)
class Query:
    resource_type: str
    # AND of ORs: a resource matches when, for every group, it has one of the keys.
    tokens: tuple[tuple[TokenKey, ...], ...] = ()
    last_updated: tuple[DateBound, ...] = ()
    count: int = 50
    offset: int = 0
    newest_first: bool = False
    # What was applied, as the client wrote it (the self link), and the names ignored.
    applied: tuple[tuple[str, str], ...] = ()
    ignored: tuple[str, ...] = field(default=())


_DATE = re.compile(
    r"^(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<H>\d{2}):(?P<M>\d{2})(?::(?P<S>\d{2})(?P<f>\.\d{1,9})?)?(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)
_PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le")


def _add_month(t: datetime) -> datetime:
    return t.replace(year=t.year + 1, month=1) if t.month == 12 else t.replace(month=t.month + 1)


def parse_date(text: str) -> DateBound:
    """`[prefix]YYYY[-MM[-DD[Thh:mm[:ss[.f]][tz]]]]` -> its bound; ValueError if not one.
    A time without a zone is taken as UTC (the server's zone)."""
    prefix = text[:2] if text[:2] in _PREFIXES else "eq"
    value = text[2:] if text[:2] in _PREFIXES else text
    m = _DATE.match(value)
    if m is None:
        raise ValueError(f"{value[:40]!r} is not a FHIR date (YYYY[-MM[-DD[Thh:mm[:ss][Z|+hh:mm]]]])")
    g = m.groupdict()
    tz = UTC
    if g["tz"] and g["tz"] != "Z":
        sign = 1 if g["tz"][0] == "+" else -1
        hours, minutes = int(g["tz"][1:3]), int(g["tz"][4:6])
        tz = timezone(sign * timedelta(hours=hours, minutes=minutes))
    start = datetime(
        int(g["y"]),
        int(g["m"] or 1),
        int(g["d"] or 1),
        int(g["H"] or 0),
        int(g["M"] or 0),
        int(g["S"] or 0),
        int(float(g["f"]) * 1_000_000) if g["f"] else 0,
        tzinfo=tz,
    )
    if g["m"] is None:
        end = start.replace(year=start.year + 1)
    elif g["d"] is None:
        end = _add_month(start)
    elif g["H"] is None:
        end = start + timedelta(days=1)
    elif g["S"] is None:
        end = start + timedelta(minutes=1)
    elif g["f"] is None:
        end = start + timedelta(seconds=1)
    else:
        end = start + timedelta(microseconds=1)
    return DateBound(prefix, start.astimezone(UTC), end.astimezone(UTC))


def split_values(text: str) -> list[str]:
    r"""A parameter's comma-separated values (OR), `\,` and `\|` escapes kept for `token`."""
    out, current, escaped = [], [], False
    for ch in text:
        if escaped:
            current.append("\\" + ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ",":
            out.append("".join(current))
            current = []
        else:
            current.append(ch)
    out.append("".join(current))
    return out


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def token_key(param: str, text: str) -> TokenKey:
    """One token value as its index key: `value`, `system|value`, `|value`, `system|`."""
    bar = re.search(r"(?<!\\)\|", text)
    if bar is None:
        value = _unescape(text)
        if not value:
            raise ValueError("an empty value")
        return (param, ANY, value)
    system, value = _unescape(text[: bar.start()]), _unescape(text[bar.end() :])
    if not system and not value:
        raise ValueError("'|' alone")
    return (param, system, value or ANY)


def _int(name: str, text: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise BadSearch("invalid_value", f"{name} must be an integer, not {text[:20]!r}", name) from None
    if not low <= value <= high:
        raise BadSearch("invalid_value", f"{name} must be between {low} and {high}", name)
    return value


def parse_query(
    resource_type: str,
    items: Sequence[tuple[str, str]],
    *,
    strict: bool,
    default_count: int,
    max_count: int,
) -> Query:
    """The query string's (name, value) pairs -> a Query; BadSearch (400) when not usable.

    `_count` above `max_count` is lowered to it (FHIR lets a server page smaller than asked)."""
    params = PARAMETERS[resource_type]
    tokens: list[tuple[TokenKey, ...]] = []
    dates: list[DateBound] = []
    applied: list[tuple[str, str]] = []
    ignored: list[str] = []
    count, offset, newest_first = default_count, 0, False
    for name, value in items:
        if name == COUNT:
            count = min(_int(COUNT, value, 0, 1 << 31), max_count)
            continue
        if name == OFFSET:
            offset = _int(OFFSET, value, 0, MAX_OFFSET)
            continue
        if name == SORT and value in (LAST_UPDATED, "-" + LAST_UPDATED):
            newest_first = value.startswith("-")
            applied.append((name, value))
            continue
        param = params.get(name)
        if param is None:
            base, colon, modifier = name.partition(":")
            if colon and (base in params or any(p.base == base for p in params.values())):
                raise BadSearch(
                    "unsupported_modifier",
                    f"modifier :{modifier[:30]} of {base} is not supported on {resource_type}",
                    name,
                )
            if strict:
                raise BadSearch(
                    "unknown_parameter",
                    f"search parameter {name[:60]!r} is not supported on {resource_type} "
                    f"(supported: {', '.join(sorted(params))})",
                    name,
                )
            ignored.append(name)
            continue
        try:
            if param.type == "date":
                dates.append(parse_date(value))
            else:
                tokens.append(tuple(token_key(name, v) for v in split_values(value)))
        except ValueError as exc:
            raise BadSearch("invalid_value", f"{name}: {exc}", name) from None
        applied.append((name, value))
    return Query(
        resource_type,
        tuple(tokens),
        tuple(dates),
        count,
        offset,
        newest_first,
        tuple(applied),
        tuple(ignored),
    )


# -- the answer --------------------------------------------------------------------------


def page_url(base: str, query: Query, offset: int) -> str:
    pairs = [*query.applied, (COUNT, str(query.count)), (OFFSET, str(offset))]
    return f"{base}/fhir/{query.resource_type}?{urlencode(pairs)}"


def searchset(
    base: str,
    query: Query,
    total: int,
    page: Sequence[Mapping[str, Any]],
    warnings: Sequence[str] = (),
) -> dict[str, Any]:
    """The searchset Bundle: `total`, self/first/previous/next links, one `match` entry per
    resource of the page, and an `outcome` entry for `warnings` (what the client should
    know about the answer: parameters ignored, results no longer kept)."""
    links = [{"relation": "self", "url": page_url(base, query, query.offset)}]
    if query.count:
        links.append({"relation": "first", "url": page_url(base, query, 0)})
        if query.offset > 0:
            links.append(
                {"relation": "previous", "url": page_url(base, query, max(query.offset - query.count, 0))}
            )
        if query.offset + query.count < total:
            links.append({"relation": "next", "url": page_url(base, query, query.offset + query.count)})
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": f"{base}/fhir/{r['resourceType']}/{r['id']}",
            "resource": r,
            "search": {"mode": "match"},
        }
        for r in page
    ]
    if warnings:
        entries.append(
            {
                "resource": {
                    "resourceType": "OperationOutcome",
                    "issue": [
                        {"severity": "warning", "code": "informational", "diagnostics": w} for w in warnings
                    ],
                },
                "search": {"mode": "outcome"},
            }
        )
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "total": total, "link": links}
    if entries:
        bundle["entry"] = entries
    return bundle
