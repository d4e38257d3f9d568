"""Write what an OTLP receiver got the way the OpenTelemetry Collector's ``file`` exporter does.

One ``ExportTraceServiceRequest`` per line in the OTLP/JSON encoding: the protobuf JSON
mapping with lowerCamelCase keys, 64-bit integers as strings, enums as integers, and (the
one difference from the plain mapping) trace and span ids as hex strings, not base64.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

__all__ = ["request_as_otlp_json", "write_collector_file"]

_IDS = ("traceId", "spanId", "parentSpanId")


def _hex_ids(node: Any) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _IDS and isinstance(value, str):
                node[key] = base64.b64decode(value).hex()
            else:
                _hex_ids(value)
    elif isinstance(node, list):
        for item in node:
            _hex_ids(item)


def request_as_otlp_json(request: ExportTraceServiceRequest) -> str:
    """One line of the collector's file exporter."""
    data = MessageToDict(request, use_integers_for_enums=True)
    _hex_ids(data)
    return json.dumps(data, separators=(",", ":"))


def write_collector_file(requests: list[ExportTraceServiceRequest], path: Path) -> Path:
    """All requests, one per line."""
    path.write_text("".join(request_as_otlp_json(r) + "\n" for r in requests))
    return path
