"""FHIR search over the results view (pure): parameters, prefixes, paging, amended
reports replacing their predecessors, eviction, and the CapabilityStatement in step
with what is implemented."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fhir.resources.R4B.bundle import Bundle

from connectors.fhir.capability import capability_statement
from connectors.fhir.result_record import UnreadableResult, decode_result
from connectors.fhir.results_index import ResultsIndex
from connectors.fhir.search import (
    ANY,
    PARAMETERS,
    BadSearch,
    Query,
    parse_date,
    parse_query,
    searchset,
    split_values,
    token_key,
)
from processors.fhir_report import URI_SYSTEM, build_result_bundle
from schemas.findings import LungNodule
from schemas.results import FhirResult, ResultHeaders, result_record
from tests.support.findings import FHIR_ORDER, finding, gallery

T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
DICOM = "urn:dicom:uid"
MRN_SYSTEM = "urn:oid:1.2.840.114350.1.13.0.1.7.5.737384.14"


def q(resource_type: str, *items: tuple[str, str], strict: bool = False, count: int = 50) -> Query:
    return parse_query(resource_type, list(items), strict=strict, default_count=count, max_count=100)


def ids(index: ResultsIndex, query: Query) -> list[str]:
    return [s.key[1] for s in index.search(query)[1]]


def study(n: int, **update: Any) -> Any:
    return finding(study_uid=f"1.2.840.99.{n}", accession_number=f"ACC{n}", patient_id=f"MRN{n}", **update)


@pytest.fixture
def index() -> ResultsIndex:
    """Ten ICH reports, one a minute from T0, for patients MRN0..MRN9."""
    index = ResultsIndex(max_resources=1000)
    for n in range(10):
        index.apply(build_result_bundle(study(n)), T0 + timedelta(minutes=n))
    return index


def report_id(index: ResultsIndex, accession: str) -> str:
    return ids(index, q("DiagnosticReport", ("identifier", accession)))[0]


# -- parsing -----------------------------------------------------------------------------


def test_token_forms() -> None:
    assert token_key("identifier", "ACC1") == ("identifier", ANY, "ACC1")
    assert token_key("identifier", f"{DICOM}|urn:oid:1.2") == ("identifier", DICOM, "urn:oid:1.2")
    assert token_key("identifier", "|ACC1") == ("identifier", "", "ACC1")
    assert token_key("identifier", f"{DICOM}|") == ("identifier", DICOM, ANY)
    assert token_key("identifier", r"a\|b") == ("identifier", ANY, "a|b")
    assert split_values(r"a,b\,c") == ["a", r"b\,c"]
    for bad in ("", "|"):
        with pytest.raises(ValueError):
            token_key("identifier", bad)


@pytest.mark.parametrize(
    ("text", "start", "end"),
    [
        ("2026", datetime(2026, 1, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)),
        ("2026-12", datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)),
        ("2026-11-24", datetime(2026, 11, 24, tzinfo=UTC), datetime(2026, 11, 25, tzinfo=UTC)),
        ("2026-11-24T12:05Z", T0 + timedelta(minutes=5), T0 + timedelta(minutes=6)),
        ("2026-11-24T12:05:00Z", T0 + timedelta(minutes=5), T0 + timedelta(minutes=5, seconds=1)),
        ("2026-11-24T13:05:00+01:00", T0 + timedelta(minutes=5), T0 + timedelta(minutes=5, seconds=1)),
        (
            "2026-11-24T12:05:00.5Z",
            T0 + timedelta(minutes=5, seconds=0.5),
            T0 + timedelta(minutes=5, microseconds=500001),
        ),
    ],
)
def test_date_precision_is_a_range(text: str, start: datetime, end: datetime) -> None:
    bound = parse_date("ge" + text)
    assert (bound.prefix, bound.start, bound.end) == ("ge", start, end)
    assert parse_date(text).prefix == "eq"


@pytest.mark.parametrize("bad", ["yesterday", "2026-13-01", "2026-11-24T25:00Z", "zz2026", "2026-11-24T12"])
def test_unreadable_dates_are_400(bad: str) -> None:
    with pytest.raises(BadSearch) as exc:
        q("DiagnosticReport", ("_lastUpdated", bad))
    assert exc.value.reason == "invalid_value"


def test_unknown_parameters_are_ignored_unless_strict() -> None:
    query = q("DiagnosticReport", ("patient", "x"), ("status", "preliminary"))
    assert query.ignored == ("patient",)
    assert query.applied == (("status", "preliminary"),)
    with pytest.raises(BadSearch) as exc:
        q("DiagnosticReport", ("patient", "x"), strict=True)
    assert exc.value.reason == "unknown_parameter"
    # Observation has no based-on here.
    assert q("Observation", ("based-on:identifier", "PL-1")).ignored == ("based-on:identifier",)


def test_unsupported_modifiers_are_400_even_lenient() -> None:
    for name in ("identifier:not", "status:missing", "subject", "subject:Patient.identifier"):
        if name == "subject":
            assert q("DiagnosticReport", (name, "Patient/1")).ignored == ("subject",)
            continue
        with pytest.raises(BadSearch) as exc:
            q("DiagnosticReport", (name, "x"))
        assert exc.value.reason == "unsupported_modifier"


def test_count_and_offset() -> None:
    assert q("Observation", ("_count", "500")).count == 100  # lowered to the maximum
    assert q("Observation").count == 50
    for name, bad in (("_count", "-1"), ("_count", "ten"), ("_offset", "-5"), ("_offset", "9999999")):
        with pytest.raises(BadSearch):
            q("Observation", (name, bad))


# -- each parameter ---------------------------------------------------------------------


def test_identifier(index: ResultsIndex) -> None:
    uid = ("identifier", f"{DICOM}|urn:oid:1.2.840.99.3")
    assert len(ids(index, q("DiagnosticReport", uid))) == 1
    assert ids(index, q("DiagnosticReport", ("identifier", "ACC3"))) == ids(index, q("DiagnosticReport", uid))
    assert len(ids(index, q("DiagnosticReport", ("identifier", "|ACC3")))) == 1  # no system
    assert ids(index, q("DiagnosticReport", ("identifier", f"{DICOM}|ACC3"))) == []  # wrong system
    assert len(ids(index, q("DiagnosticReport", ("identifier", f"{DICOM}|")))) == 10
    assert len(ids(index, q("DiagnosticReport", ("identifier", "ACC3,ACC4,nope")))) == 2  # OR
    assert len(ids(index, q("DiagnosticReport", ("identifier", "FL-2002")))) == 10  # the filler number


def test_subject_identifier(index: ResultsIndex) -> None:
    found = ids(index, q("DiagnosticReport", ("subject:identifier", f"{MRN_SYSTEM}|MRN5")))
    assert found == [report_id(index, "ACC5")]
    assert ids(index, q("DiagnosticReport", ("subject:identifier", "other|MRN5"))) == []
    assert len(ids(index, q("Observation", ("subject:identifier", "MRN5")))) == 1


def test_based_on_identifier() -> None:
    index = ResultsIndex(1000)
    index.apply(build_result_bundle(study(1)), T0)  # HL7 order: placer PL-1001
    index.apply(build_result_bundle(study(2, order=FHIR_ORDER)), T0)  # filler FL-77 only
    index.apply(build_result_bundle(study(3, order=None)), T0)  # no order: the accession
    assert len(ids(index, q("DiagnosticReport", ("based-on:identifier", "PL-1001")))) == 1
    assert len(ids(index, q("DiagnosticReport", ("based-on:identifier", "FL-77")))) == 1
    assert len(ids(index, q("DiagnosticReport", ("based-on:identifier", "ACC3")))) == 1
    assert ids(index, q("DiagnosticReport", ("based-on:identifier", "ACC1"))) == []


def test_status_code_and_id(index: ResultsIndex) -> None:
    assert len(ids(index, q("DiagnosticReport", ("status", "preliminary")))) == 10
    assert ids(index, q("DiagnosticReport", ("status", "final"))) == []
    system_status = "http://hl7.org/fhir/diagnostic-report-status|preliminary"
    assert len(ids(index, q("DiagnosticReport", ("status", system_status)))) == 10
    assert (
        len(ids(index, q("Observation", ("code", "https://radtriage.dev/fhir/CodeSystem/ai-finding|ICH"))))
        == 10
    )
    rid = report_id(index, "ACC7")
    assert ids(index, q("DiagnosticReport", ("_id", rid))) == [rid]
    assert ids(index, q("Observation", ("_id", rid))) == []  # a report's id is not an Observation's


def test_derived_from_identifier(index: ResultsIndex) -> None:
    found = ids(index, q("Observation", ("derived-from:identifier", f"{DICOM}|urn:oid:1.2.840.99.4")))
    assert len(found) == 1
    assert index.get("Observation", found[0]) is not None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("ge2026-11-24T12:05:00Z", [5, 6, 7, 8, 9]),
        ("gt2026-11-24T12:05:00Z", [6, 7, 8, 9]),
        ("le2026-11-24T12:02:00Z", [0, 1, 2]),
        ("lt2026-11-24T12:02:00Z", [0, 1]),
        ("2026-11-24T12:03:00Z", [3]),
        ("eq2026-11-24T12:03Z", [3]),
        ("ne2026-11-24T12:03Z", [0, 1, 2, 4, 5, 6, 7, 8, 9]),
        ("2026-11-24", list(range(10))),
        ("gt2026-11-24", []),
        ("lt2026-11-24", []),
    ],
)
def test_last_updated_prefixes(index: ResultsIndex, value: str, expected: list[int]) -> None:
    found = ids(index, q("DiagnosticReport", ("_lastUpdated", value)))
    assert found == [report_id(index, f"ACC{n}") for n in expected]


def test_combinations_are_and(index: ResultsIndex) -> None:
    query = q(
        "DiagnosticReport",
        ("_lastUpdated", "ge2026-11-24T12:02Z"),
        ("_lastUpdated", "lt2026-11-24T12:06Z"),
        ("identifier", "ACC1,ACC3,ACC5,ACC7"),
        ("status", "preliminary"),
    )
    assert ids(index, query) == [report_id(index, "ACC3"), report_id(index, "ACC5")]
    assert ids(index, q("DiagnosticReport", ("identifier", "ACC3"), ("identifier", "ACC4"))) == []


# -- paging and the Bundle ---------------------------------------------------------------


def test_paging_walks_every_match_once(index: ResultsIndex) -> None:
    seen: list[str] = []
    offset = 0
    while True:
        query = q("DiagnosticReport", ("status", "preliminary"), ("_count", "3"), ("_offset", str(offset)))
        total, page = index.search(query)
        assert total == 10
        bundle = searchset("http://h", query, total, [s.resource for s in page])
        Bundle.model_validate(bundle)
        seen += [e["resource"]["id"] for e in bundle.get("entry", [])]
        links = {link["relation"]: link["url"] for link in bundle["link"]}
        assert "status=preliminary" in links["self"] and f"_offset={offset}" in links["self"]
        if "next" not in links:
            break
        assert "_count=3" in links["next"]
        offset = int(links["next"].rsplit("_offset=", 1)[1])
    assert seen == ids(index, q("DiagnosticReport", ("_count", "100")))
    assert len(set(seen)) == 10


def test_newest_first(index: ResultsIndex) -> None:
    assert ids(index, q("DiagnosticReport", ("_sort", "-_lastUpdated"))) == list(
        reversed(ids(index, q("DiagnosticReport")))
    )


def test_count_zero_gives_the_total_only(index: ResultsIndex) -> None:
    query = q("Observation", ("_count", "0"))
    total, page = index.search(query)
    bundle = searchset("http://h", query, total, [s.resource for s in page])
    assert (bundle["total"], "entry" in bundle) == (10, False)


def test_self_link_shows_only_what_was_applied() -> None:
    query = q("DiagnosticReport", ("foo", "bar"), ("identifier", "A|B"))
    bundle = searchset("http://h", query, 0, [], ["ignored: foo"])
    self_url = bundle["link"][0]["url"]
    assert "foo" not in self_url and "identifier=A%7CB" in self_url
    assert bundle["entry"][0]["search"]["mode"] == "outcome"
    Bundle.model_validate(bundle)


# -- versions, amendments, bounds --------------------------------------------------------


def test_observation_found_by_its_identifier_the_same_after_an_amendment() -> None:
    index = ResultsIndex(1000)
    first = finding(
        "NODULE",
        nodules=(LungNodule(lung="left", diameter_mm=8, centre_lps_mm=(1, 2, 3), probability=0.9),) * 2,
    )
    bundle = build_result_bundle(first)
    observations = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"]
    assert len(observations) == 3
    tokens = []
    for o in observations:
        (ident,) = o["identifier"]
        assert ident == {"system": URI_SYSTEM, "value": f"urn:uuid:{o['id']}"}
        tokens.append(f"{URI_SYSTEM}|{ident['value']}")
    index.apply(bundle, T0)
    for token, o in zip(tokens, observations, strict=True):
        assert ids(index, q("Observation", ("identifier", token))) == [o["id"]]
        assert ids(index, q("Observation", ("identifier", token.partition("|")[2]))) == [o["id"]]
    assert ids(index, q("Observation", ("identifier", f"{URI_SYSTEM}|urn:uuid:nope"))) == []
    # An amended report (a new request id, a re-read): the same identifiers, found again.
    amended = first.model_copy(update={"request_id": "r-2", "amends_request_id": first.request_id})
    again = build_result_bundle(amended)
    assert [e["resource"].get("identifier") for e in again["entry"]] == [
        e["resource"].get("identifier") for e in bundle["entry"]
    ]
    index.apply(again, T0 + timedelta(minutes=1))
    found = index.get("Observation", ids(index, q("Observation", ("identifier", tokens[0])))[0])
    assert found is not None and found.version == 2 and found.resource["status"] == "amended"


def test_served_resources_have_meta_and_relative_references(index: ResultsIndex) -> None:
    report = index.get("DiagnosticReport", report_id(index, "ACC2"))
    assert report is not None
    assert report.resource["meta"] == {"versionId": "1", "lastUpdated": "2026-11-24T12:02:00Z"}
    (result,) = report.resource["result"]
    kind, _, obs_id = result["reference"].partition("/")
    assert kind == "Observation" and index.get("Observation", obs_id) is not None
    observation = index.get("Observation", obs_id)
    assert (
        observation is not None and "reference" not in observation.resource["device"]
    )  # the Device is not served
    assert observation.resource["device"]["display"]


def test_amended_report_replaces_its_predecessor() -> None:
    index = ResultsIndex(1000)
    first = finding(
        "NODULE",
        nodules=(LungNodule(lung="left", diameter_mm=8, centre_lps_mm=(1, 2, 3), probability=0.9),) * 2,
    )
    index.apply(build_result_bundle(first), T0)
    assert index.counts() == {"DiagnosticReport": 1, "Observation": 3}
    amended = first.model_copy(update={"amends_request_id": first.request_id, "nodules": first.nodules[:1]})
    index.apply(build_result_bundle(amended), T0 + timedelta(minutes=1))
    # The same report (same id, same identifiers), version 2, amended; the nodule the
    # re-read no longer has is gone.
    assert index.counts() == {"DiagnosticReport": 1, "Observation": 2}
    (rid,) = ids(index, q("DiagnosticReport", ("identifier", "ACC42")))
    report = index.get("DiagnosticReport", rid)
    assert report is not None and report.version == 2 and report.resource["status"] == "amended"
    assert ids(index, q("DiagnosticReport", ("status", "preliminary"))) == []
    assert ids(index, q("DiagnosticReport", ("_lastUpdated", "le2026-11-24T12:00:59Z"))) == []


def test_a_duplicate_keeps_version_and_last_updated(index: ResultsIndex) -> None:
    applied = index.apply(build_result_bundle(study(4)), T0 + timedelta(hours=1))
    assert (sum(applied.stored.values()), applied.unchanged) == (0, 2)
    report = index.get("DiagnosticReport", report_id(index, "ACC4"))
    assert report is not None and (report.version, report.last_updated) == (1, T0 + timedelta(minutes=4))


def test_eviction_drops_the_oldest_reports_with_their_observations() -> None:
    index = ResultsIndex(max_resources=6)  # three reports with one Observation each
    evicted = []
    for n in range(5):
        evicted.append(index.apply(build_result_bundle(study(n)), T0 + timedelta(minutes=n)).evicted)
    assert len(index) == 6 and index.evicted_total == 4
    assert evicted[3] == {"DiagnosticReport": 1, "Observation": 1}
    assert ids(index, q("DiagnosticReport", ("identifier", "ACC0,ACC1"))) == []
    assert len(ids(index, q("Observation"))) == 3
    assert index.evicted_through == T0 + timedelta(minutes=1)
    # An update makes a report the newest: it is evicted last.
    index.apply(build_result_bundle(study(2, probability=0.99)), T0 + timedelta(minutes=9))
    index.apply(build_result_bundle(study(5)), T0 + timedelta(minutes=10))
    assert len(ids(index, q("DiagnosticReport", ("identifier", "ACC2")))) == 1
    assert ids(index, q("DiagnosticReport", ("identifier", "ACC3"))) == []


def test_every_report_shape_is_indexed() -> None:
    index = ResultsIndex(1000)
    for n, f in enumerate(gallery().values()):
        index.apply(build_result_bundle(f.model_copy(update={"study_uid": f"1.2.3.{n}"})), T0)
    total, _ = index.search(q("DiagnosticReport"))
    assert total == len(gallery())


# -- the record and the statement --------------------------------------------------------


def test_decode_result_reads_the_plain_bundle_and_the_old_envelope() -> None:
    bundle = build_result_bundle(finding())
    value, headers = result_record(bundle, ResultHeaders(study_uid="1.2", finding="ICH", produced_at=T0))
    decoded = decode_result(value, headers)
    assert decoded.bundle == bundle and decoded.produced_at == T0
    # A record written before the upgrade: the envelope, no headers.
    old = FhirResult(study_uid="1.2", finding="ICH", bundle=bundle, produced_at=T0).to_bytes()
    decoded = decode_result(old)
    assert decoded.bundle == bundle and decoded.produced_at == T0
    for bad, why in (
        (b"", "empty"),
        (b"{", "not JSON"),
        (b'{"study_uid": "1"}', "neither"),
        (value, "missing header"),  # the Bundle without its headers
    ):
        with pytest.raises(UnreadableResult, match=why):
            decode_result(bad)
    with pytest.raises(ValueError):
        ResultsIndex(10).apply({"resourceType": "Bundle", "entry": []}, T0)


def test_capability_statement_lists_exactly_the_implemented_parameters() -> None:
    statement = capability_statement("http://h", "1")
    by_type = {r["type"]: r for r in statement["rest"][0]["resource"]}
    for resource_type, params in PARAMETERS.items():
        resource = by_type[resource_type]
        assert {i["code"] for i in resource["interaction"]} == {"read", "search-type"}
        assert {p["name"] for p in resource["searchParam"]} == {p.base for p in params.values()}
        for p in params.values():
            listed = next(s for s in resource["searchParam"] if s["name"] == p.base)
            assert listed["type"] == p.type
    off = capability_statement("http://h", "1", read_search=False)
    assert {r["type"] for r in off["rest"][0]["resource"]} == {"ServiceRequest", "ImagingStudy"}


def test_prefer_handling_strict() -> None:
    from connectors.fhir.read import strict_handling

    assert strict_handling("handling=strict")
    assert strict_handling("return=minimal, handling = strict")
    assert not strict_handling("handling=lenient") and not strict_handling("")
