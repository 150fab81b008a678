"""The latest DiagnosticReports and Observations of the results topic, indexed for search
(pure: no I/O, no clock; connectors/fhir/results_view.py feeds it and locks around it).

A report Bundle is applied as a unit (a *group*: the report and its Observations).
Resource ids are derived from the study and finding (processors/fhir_report.py), so the
amended report of a re-read has the id, and the identifiers, of the one it replaces:
applying its Bundle replaces the earlier versions, and drops the earlier group's
Observations the new one no longer has (a nodule fewer). A Bundle published again
unchanged (stages are at-least-once) keeps its version and lastUpdated.

Bounded: past `max_resources` the groups applied longest ago are evicted whole. An
evicted resource is no longer read nor found: a search is complete only over what the
view still holds (the searchset says so in an `outcome` entry once anything was evicted).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections import Counter, OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from connectors.fhir.search import SEARCHABLE_TYPES, Query, TokenKey, index_keys

Key = tuple[str, str]  # (resourceType, id)
URN_UUID = "urn:uuid:"


@dataclass(frozen=True)
class Stored:
    key: Key
    # The resource as served (references made relative, meta set), as its JSON text: a
    # third of the memory the same resource takes as Python dicts (bench/RESULTS.md).
    body: bytes
    last_updated: datetime
    version: int
    digest: str
    tokens: frozenset[TokenKey]

    @property
    def resource(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


@dataclass(frozen=True)
class Applied:
    stored: Counter[str]  # new versions, by resource type
    unchanged: int
    removed: Counter[str]  # Observations an amended group no longer has
    evicted: Counter[str]


def _digest(resource: Mapping[str, Any]) -> str:
    body = {k: v for k, v in resource.items() if k != "meta"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _relink(node: Any, served: Mapping[str, str]) -> Any:
    """References to other entries of the Bundle (`urn:uuid:<id>`) made servable: to a
    resource this view serves, `Type/<id>` (relative to the server's base); to one it does
    not (the Device), the reference is dropped and its display kept — a `urn:uuid` means
    nothing outside its Bundle."""
    if isinstance(node, list):
        return [_relink(v, served) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _relink(v, served) for k, v in node.items()}
    ref = out.get("reference")
    if isinstance(ref, str) and ref.startswith(URN_UUID):
        target = served.get(ref[len(URN_UUID) :])
        if target is not None:
            out["reference"] = target
        else:
            del out["reference"]
    return out


def group_resources(bundle: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The Bundle's DiagnosticReports and Observations, references relinked."""
    resources = [
        e["resource"]
        for e in bundle.get("entry") or []
        if isinstance(e, Mapping)
        and isinstance(e.get("resource"), Mapping)
        and e["resource"].get("resourceType") in SEARCHABLE_TYPES
        and isinstance(e["resource"].get("id"), str)
    ]
    served = {r["id"]: f"{r['resourceType']}/{r['id']}" for r in resources}
    return [_relink(copy.deepcopy(r), served) for r in resources]


class ResultsIndex:
    def __init__(self, max_resources: int) -> None:
        self.max_resources = max_resources
        self._resources: dict[Key, Stored] = {}
        self._by_type: dict[str, dict[str, Stored]] = {t: {} for t in SEARCHABLE_TYPES}
        self._index: dict[TokenKey, set[Key]] = {}
        # group key -> its members, the group applied longest ago first (eviction order).
        self._groups: OrderedDict[Key, tuple[Key, ...]] = OrderedDict()
        self._group_of: dict[Key, Key] = {}
        self.evicted_total = 0
        # The newest lastUpdated among evicted resources: results before it may be missing.
        self.evicted_through: datetime | None = None

    def __len__(self) -> int:
        return len(self._resources)

    def counts(self) -> dict[str, int]:
        return {t: len(by_id) for t, by_id in self._by_type.items()}

    def get(self, resource_type: str, resource_id: str) -> Stored | None:
        return self._by_type.get(resource_type, {}).get(resource_id)

    # -- changes ---------------------------------------------------------------------------

    def apply(self, bundle: Mapping[str, Any], produced_at: datetime) -> Applied:
        """One report Bundle: its resources become the latest versions; ValueError if it
        holds no DiagnosticReport or Observation."""
        resources = group_resources(bundle)
        if not resources:
            raise ValueError("the Bundle holds no DiagnosticReport or Observation")
        members = tuple((r["resourceType"], r["id"]) for r in resources)
        reports = [k for k in members if k[0] == "DiagnosticReport"]
        group = reports[0] if reports else members[0]
        stored: Counter[str] = Counter()
        removed: Counter[str] = Counter()
        unchanged = 0
        # A resource listed in another group before (ids are per study and finding, so only
        # if a Bundle's shape changed) leaves that group.
        for key in members:
            other = self._group_of.get(key)
            if other is not None and other != group:
                self._groups[other] = tuple(k for k in self._groups[other] if k != key)
        previous = self._groups.pop(group, ())
        for key in previous:
            if key not in members:
                self._remove(key)
                removed[key[0]] += 1
        for resource in resources:
            if self._put(resource, produced_at):
                stored[resource["resourceType"]] += 1
            else:
                unchanged += 1
        self._groups[group] = members  # newest last
        for key in members:
            self._group_of[key] = group
        evicted = self._evict(keep=group)
        return Applied(stored, unchanged, removed, evicted)

    def _put(self, resource: dict[str, Any], produced_at: datetime) -> bool:
        key: Key = (resource["resourceType"], resource["id"])
        digest = _digest(resource)
        old = self._resources.get(key)
        if old is not None and old.digest == digest:
            return False
        version = old.version + 1 if old is not None else 1
        resource["meta"] = {
            **(resource.get("meta") or {}),
            "versionId": str(version),
            "lastUpdated": produced_at.isoformat().replace("+00:00", "Z"),
        }
        if old is not None:
            self._unindex(old)
        body = json.dumps(resource, ensure_ascii=False, separators=(",", ":")).encode()
        entry = Stored(key, body, produced_at, version, digest, index_keys(key[0], resource))
        self._resources[key] = entry
        self._by_type[key[0]][key[1]] = entry
        for token in entry.tokens:
            self._index.setdefault(token, set()).add(key)
        return True

    def _unindex(self, entry: Stored) -> None:
        for token in entry.tokens:
            keys = self._index.get(token)
            if keys is not None:
                keys.discard(entry.key)
                if not keys:
                    del self._index[token]

    def _remove(self, key: Key) -> Stored | None:
        entry = self._resources.pop(key, None)
        if entry is not None:
            del self._by_type[key[0]][key[1]]
            self._unindex(entry)
        self._group_of.pop(key, None)
        return entry

    def _evict(self, keep: Key) -> Counter[str]:
        evicted: Counter[str] = Counter()
        while len(self._resources) > self.max_resources and len(self._groups) > 1:
            group, members = next(iter(self._groups.items()))
            if group == keep:  # pragma: no cover - keep is always the newest
                break
            del self._groups[group]
            for key in members:
                entry = self._remove(key)
                if entry is not None:
                    evicted[key[0]] += 1
                    self.evicted_total += 1
                    if self.evicted_through is None or entry.last_updated > self.evicted_through:
                        self.evicted_through = entry.last_updated
        return evicted

    # -- search ----------------------------------------------------------------------------

    def _candidates(self, query: Query) -> Iterator[Stored]:
        by_id = self._by_type[query.resource_type]
        if not query.tokens:
            yield from by_id.values()
            return
        keys: set[Key] | None = None
        # The most selective group first: intersections then stay small.
        groups = sorted(
            (set().union(*(self._index.get(k, ()) for k in group)) for group in query.tokens), key=len
        )
        for found in groups:
            keys = found if keys is None else keys & found
            if not keys:
                return
        for key in keys or ():
            if key[0] == query.resource_type:
                yield self._resources[key]

    def search(self, query: Query) -> tuple[int, list[Stored]]:
        """(how many match, the page the query asks for), in lastUpdated order then id."""
        matches = [
            s for s in self._candidates(query) if all(b.admits(s.last_updated) for b in query.last_updated)
        ]
        matches.sort(key=lambda s: (s.last_updated, s.key[1]), reverse=query.newest_first)
        return len(matches), matches[query.offset : query.offset + query.count]
