"""The OTLP exporter puts our spans on the wire in both transports a collector speaks.

The receivers are the OTLP protocol's own server side (the generated gRPC TraceService and
an HTTP endpoint decoding ExportTraceServiceRequest), so what is checked is what a real
collector would receive: span names, attributes and the trace id.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from radtriage.settings import Settings
from radtriage.tracing_sdk import _otlp_exporter
from tests.support.net import free_port

Received = list[trace_service_pb2.ExportTraceServiceRequest]


class _GrpcTraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, received: Received) -> None:
        self.received = received

    def Export(self, request: Any, context: Any) -> Any:  # the proto's method name
        self.received.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def grpc_receiver() -> Iterator[tuple[str, Received]]:
    received: Received = []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_GrpcTraceService(received), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"http://127.0.0.1:{port}", received
    finally:
        server.stop(grace=None)


@pytest.fixture
def http_receiver() -> Iterator[tuple[str, Received]]:
    received: Received = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # http.server's naming
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path != "/v1/traces" or self.headers["Content-Type"] != "application/x-protobuf":
                self.send_response(404)
                self.end_headers()
                return
            received.append(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.end_headers()
            self.wfile.write(trace_service_pb2.ExportTraceServiceResponse().SerializeToString())

        def log_message(self, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1/traces", received
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.integration
@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_spans_reach_an_otlp_receiver(
    protocol: str, grpc_receiver: tuple[str, Received], http_receiver: tuple[str, Received]
) -> None:
    endpoint, received = grpc_receiver if protocol == "grpc" else http_receiver
    settings = Settings()
    settings.telemetry.exporter = "otlp"
    settings.telemetry.otlp_protocol = protocol  # type: ignore[assignment]
    settings.telemetry.otlp_endpoint = endpoint
    # A provider of its own: the session's global one must stay as it is for other tests.
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_otlp_exporter(settings)))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("assemble", attributes={"radtriage.study_uid": "1.2.3"}) as span:
        trace_id = span.get_span_context().trace_id
    provider.shutdown()

    spans = [s for req in received for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert [s.name for s in spans] == ["assemble"]
    assert int.from_bytes(spans[0].trace_id, "big") == trace_id
    attrs = {a.key: a.value.string_value for a in spans[0].attributes}
    assert attrs == {"radtriage.study_uid": "1.2.3"}
