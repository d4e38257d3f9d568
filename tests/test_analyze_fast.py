"""The fast path of ``analyze`` gives exactly what parsing every line gives.

The reference parses every line in full with orjson and aggregates each record; the fast
path matches whole chunks with one regular expression and sends whatever deviates to the
exact path. Their ``--format json`` output (every figure of every row) and side tables
must be identical, on the library's own lines and on every kind of deviation.
"""

from __future__ import annotations

import gzip
import math
import random
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rag_instrument.analysis import Aggregator, Analysis, Source, _aggregate, _fast, _read, analyze
from rag_instrument.analysis._render import render_json
from rag_instrument.analysis._stats import ExactSum

TS = "2026-11-25T15:33:19.123456Z"


def _line(event: str, *, level: str = "info", logger: str = "rag_instrument",
          context: dict[str, object] | None = None, ts: str = TS, **fields: object) -> bytes:
    record: dict[str, object] = {
        "timestamp": ts, "level": level, "event": event, "logger": logger,
        "trace_id": "ab" * 16, "span_id": "cd" * 8, "context": context or {"request_id": "r1"},
    }
    record.update(fields)
    return orjson.dumps(record)


def _stage(stage: str, ms: object, breakdown: object = None, **extra: object) -> bytes:
    fields: dict[str, object] = {"execution_time_ms": ms, **extra}
    if breakdown is not None:
        fields["breakdown"] = breakdown
    return _line(f"{stage} completed", context={"pipeline_stage": stage, "request_id": "r1"},
                 **fields)


def _llm(stage: str, hit: bool, provider: str = "openai", model: str = "gpt-4o") -> bytes:
    return _line("llm call completed", stage=stage, execution_time_ms=12.5, operation="chat",
                 provider=provider, model=model, response_model=model, input_tokens=9,
                 output_tokens=12, cache_hit=hit)


def _request(rng: random.Random) -> list[bytes]:
    """One request as the library logs it: app line, LLM lines, stages, request line."""
    ms = {s: round(rng.lognormvariate(3, 0.6), 3)
          for s in ("query_rewriting", "embedding", "retrieval", "reranking", "generation")}
    ms["retrieval"] = round(ms["embedding"] + 0.9, 3)  # embedding runs inside retrieval
    start = rng.randrange(10**6)

    def at(ms_after: float) -> str:  # a timestamp ms_after the request's start
        micros = start * 10**6 + round(ms_after * 1000)
        return f"2026-11-25T15:{micros // 60_000_000 % 60:02d}:{micros // 10**6 % 60:02d}.{micros % 10**6:06d}Z"

    rewrite_end = ms["query_rewriting"]
    embed_end = rewrite_end + ms["embedding"] + 0.5
    retrieval_end = embed_end + 0.5
    rerank_end = retrieval_end + ms["reranking"]
    generation_end = rerank_end + ms["generation"]
    total = round(generation_end + 1, 3)
    trace = f'"{rng.getrandbits(128):032x}"'.encode()
    return [line.replace(b'"' + b"ab" * 16 + b'"', trace) for line in [
        _line("question received", logger="app", chars=rng.randint(1, 300)),
        _llm("query_rewriting", rng.random() < 0.3),
        _stage("query_rewriting", ms["query_rewriting"], ts=at(rewrite_end)),
        _stage("embedding", ms["embedding"], {"embedding": {"count": 1, "ms": 3.25}},
               ts=at(embed_end)),
        _stage("retrieval", ms["retrieval"], {"db": {"count": 3, "ms": round(ms["retrieval"] / 9, 3)},
                                              "vector": {"count": 1, "ms": 2}}, ts=at(retrieval_end)),
        _stage("reranking", ms["reranking"], ts=at(rerank_end), cpu_ms=round(ms["reranking"] / 3, 3)),
        _llm("generation", rng.random() < 0.3, provider=rng.choice(["openai", "anthropic"])),
        _stage("generation", ms["generation"], {"llm": {"count": 1, "ms": ms["generation"] / 2}},
               ts=at(generation_end)),
        _stage("search", total, ts=at(total)),
        _line("request completed", method="POST", route="/api/search", status=200,
              execution_time_ms=total + 1, ts=at(total + 1)),
    ]]


#: Lines that deviate from the usual shapes, each of which the fast path must not misread.
ODD_LINES: list[bytes] = [
    b'{"timestamp":"2026-11-25T15:33:19.123456Z","level":"info","event":"retrieval comp',  # cut
    b"\x00\x01\x02 binary \xff\xfe",
    b"not json at all",
    b"",
    b"[1, 2, 3]",
    _stage("retrieval", "12"),  # a string
    _stage("retrieval", -5.0),  # negative
    _stage("retrieval", 0),  # an int, and zero
    _stage("retrieval", 7),
    _stage("retrieval", 12.5).replace(b"12.5", b"NaN"),  # not JSON
    _stage("retrieval", 12.5).replace(b"12.5", b"1e400"),  # infinite
    _stage("retrieval", 12.5).replace(b"12.5", b"1.5e2"),  # an exponent
    _stage("retrieval", 12.5).replace(b"12.5", b"0012.5"),  # not a JSON number
    _stage("retrieval", 12.5).replace(b"12.5", b"9" * 30),  # a huge int
    _line(  # an error
        "retrieval failed", level="error", context={"pipeline_stage": "retrieval"},
        execution_time_ms=99.5, error_type="TimeoutError"),
    _line("retrieval cancelled", level="warning", context={"pipeline_stage": "retrieval"},
          execution_time_ms=3.5, error_type="cancelled"),
    _stage("retrieval", 40.0, status=503),  # a status
    _stage("retrieval", 41.0)[:-1] + b',"execution_time_ms":"x"}',  # a duplicate key
    _stage("retrieval", 42.0)[:-1] + b',"level":"error"}',  # a later level
    _stage("retrieval", 43.0, {"db": {"count": 1, "ms": 4}})[:-1] + b',"status":500}',
    _stage("retrieval", 44.0, {"cache": {"hits": 2, "misses": 1}, "db": {"ms": 1}}),
    _stage("retrieval", 45.0, {"db": 5, "vector": {"ms": "7"}, "x": {"ms": -1}}),
    _stage("retrieval", 46.0, {"db": {"ms": True}}),
    _stage("retrieval", 47.0, {"db": {"ms": 1.0}}).replace(b'"ms":1.0', b'"ms":1.0,"ms":2.0'),
    _stage("retrieval", 48.0).replace(b'"request_id":"r1"', b'"request_id":"r\\"1"'),  # escape
    _stage("retrieval", 49.0).replace(b'"pipeline_stage":"retrieval"',
                                      b'"pipeline_stage":"retr\\u0069eval"'),
    _stage("retrieval", 50.0).replace(b'"request_id":"r1"', b'"request_id":"r\\u00e9"'),
    _stage("retrieval", 51.0).replace(b'"request_id":"r1"', "\"request_id\":\"ré\"".encode()),
    _stage("retrieval", 52.0).replace(b'"abab', b'"a\tbab'),  # a raw control character
    _stage("retrieval", 53.0) + b"\r",  # CRLF
    _stage("retrieval", 54.0).replace(b'"request_id":"r1"',
                                      b'"request_id":"r1","pipeline_stage":"rerank"'),
    _stage("retrieval", 55.0).replace(b'"context":', b'"context":{"x":1},"context":'),
    _stage("reranking", 20.0, cpu_ms=-1.0),  # CPU times the exact path ignores
    _stage("reranking", 21.0, cpu_ms="2"),
    _stage("reranking", 22.0, cpu_ms=2.5).replace(b'"cpu_ms":2.5', b'"cpu_ms":2.5,"cpu_ms":3'),
    _stage("reranking", 23.0, {"db": {"count": 1, "ms": 4}}, items=3, cpu_ms=1.25),
    _line("reranking completed", context={"pipeline_stage": "reranking"}, cpu_ms=4.0,
          execution_time_ms=24.0),  # before the duration
    _stage("", 56.0),  # an empty stage name
    _stage("late_stage", 57.0),  # a stage first seen late
    _stage("retrieval", 58.0, logger="app"),
    orjson.dumps({"context": {"pipeline_stage": "retrieval"}, "execution_time_ms": 59.0,
                  "level": "info", "event": "retrieval completed"}),  # another key order
    _line("retrieval completed", context={"request_id": "r1", "pipeline_stage": "retrieval"},
          execution_time_ms=60.0),
    _stage("retrieval", 61.0, breakdown={"db": {"count": 1, "ms": 2.5}}).replace(b"}}}", b"}} }"),
    _stage("retrieval", 62.0) .replace(b"62.0", b"62.0 "),
    _line("retrying", level="warning", stage="generation", target="OpenAIProvider.generate",
          attempt=1, error_type="RateLimitError", wait_s=0.5),
    _line("retrying", stage="generation", target="X.y", error_type="E"),  # info retry
    _line("slow query", level="warning", stage="retrieval", pipeline_stage="retrieval",
          execution_time_ms=210.5, **{"db.query.text": "SELECT * FROM chunks"}),
    _line("slow query", stage="retrieval", context={"pipeline_stage": "retrieval"},
          execution_time_ms=300.0, **{"db.query.text": "SELECT 1"}),
    _line("n+1 query detected", level="warning", stage="retrieval",
          relationship="Document.chunks", count=12),
    _line("budget exceeded", level="warning", stage="retrieval", budget_ms=30.0,
          execution_time_ms=99.0, largest={"kind": "db", "ms": 20}),
    _line("budget exceeded", context={"pipeline_stage": "retrieval"}, stage="retrieval",
          budget_ms=31.0, execution_time_ms=98.0, largest="vector"),
    _llm("generation", True, provider="", model=""),
    _llm("generation", True, provider="openai", model="gpt-4o").replace(
        b'"cache_hit":true', b'"cache_namespace":"ns","cache_hit":true'),
    _llm("generation", False).replace(b'"logger":"rag_instrument"', b'"logger":"other"'),
    _llm("generation", True).replace(b'"provider":"openai"', b'"provider":"openai","x":[1]'),
    _llm("generation", True).replace(b'"cache_hit":true', b'"cache_hit":1'),
    _line("request completed", cache_hit=True, provider="p", model="m"),
    _line("question received", logger="app", cache_hit=True),
]
#: An OTLP line (its spans count as stage runs, and nest the stages by their parents).
OTLP_LINE = (
    orjson.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [{
        "traceId": "ef" * 16, "spanId": "12" * 8, "name": "retrieval",
        "startTimeUnixNano": "1764084799000000000", "endTimeUnixNano": "1764084799030000000",
        "attributes": [{"key": "rag.stage", "value": {"stringValue": "retrieval"}}]}]}]}]})
)


def _reference(paths: list[Path], budgets: dict[str, float] | None = None) -> Analysis:
    aggregator = Aggregator(budgets=budgets)
    for path in paths:
        for first, lines in _read.read_blocks(Source(str(path)), aggregator.report):
            aggregator.feed_every_line(str(path), first, lines)
    return aggregator.result()


def _same(fast: Analysis, reference: Analysis) -> None:
    assert render_json(fast) == render_json(reference)
    for table in ("slow_queries", "n_plus_one", "retries", "cache", "budget_exceeded"):
        assert getattr(fast, table) == getattr(reference, table), table
    assert fast.used == reference.used


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many chunks and few nesting samples, so that the fast path does the work."""
    monkeypatch.setattr(_read, "BLOCK", 8192)
    monkeypatch.setattr(_aggregate, "_NEST_LINES", 20)


def _write(path: Path, lines: list[bytes], gz: bool = False) -> Path:
    data = b"\n".join(lines) + b"\n"
    if gz:
        path = path.with_suffix(".jsonl.gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def _varied_log(seed: int) -> list[bytes]:
    rng = random.Random(seed)
    lines: list[bytes] = []
    odd = list(ODD_LINES)
    rng.shuffle(odd)
    for i in range(120):
        lines.extend(_request(rng))
        if i >= 10 and odd:
            lines.append(odd.pop())
    return lines + odd


@pytest.mark.parametrize("gz", [False, True])
def test_the_fast_path_prints_what_parsing_every_line_prints(tmp_path: Path, gz: bool) -> None:
    log = _write(tmp_path / "rag.jsonl", _varied_log(1), gz)
    budgets = {"retrieval": 25.0, "search": 150.0}
    fast = analyze([str(log)], budgets=budgets)
    _same(fast, _reference([log], budgets))
    rows = {row.key: row for row in fast.rows}
    # What the odd lines mean, as the reference reads them.
    assert rows["retrieval"].errors == 4
    assert rows["retrieval"].cancelled == 1
    assert rows["retrieval"].statuses == {"5xx": 2}
    assert rows["retrieval"].cache_hit_ratio == pytest.approx(2 / 3)
    assert rows["reranking"].cpu_runs == 120 + 3
    assert "late_stage" in rows
    assert "" in rows
    assert rows["embedding"].parent == "retrieval"
    assert fast.inputs.bad_lines >= 5


def test_the_fast_path_really_reads_the_usual_lines(tmp_path: Path) -> None:
    lines = _varied_log(2)
    chunk = b"\n" + b"\n".join(lines) + b"\n"
    matched = len(_fast._LINE.findall(chunk))
    assert matched >= 120 * 10  # every usual line (and a few odd ones that mean no harm)


def test_odd_lines_never_match_as_a_usual_stage_line() -> None:
    usual = {_stage("retrieval", 41.0), _stage("retrieval", 0), _stage("retrieval", 7),
             _stage("late_stage", 57.0), _stage("retrieval", 58.0, logger="app"),
             _stage("retrieval", 44.0, {"cache": {"hits": 2, "misses": 1}, "db": {"ms": 1}}),
             _stage("retrieval", 45.0, {"db": 5, "vector": {"ms": "7"}, "x": {"ms": -1}}),
             _stage("retrieval", 46.0, {"db": {"ms": True}}),
             _stage("retrieval", 47.0, {"db": {"ms": 1.0}}).replace(
                 b'"ms":1.0', b'"ms":1.0,"ms":2.0')}
    for line in ODD_LINES:
        if not line.translate(_fast._UNUSUAL).isascii():
            # Escapes, control characters, non-ASCII: such a line always goes the exact way.
            assert any(c in line for c in (b"\\", b"\t", b"\r", b"\x00", "é".encode())), line
            continue
        found = _fast._LINE.match(b"\n" + line + b"\n")
        if found is not None and found.group(2) is not None:
            assert line in usual, line


def test_one_job_and_two_print_the_same_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rag_instrument.analysis import _parallel

    monkeypatch.setattr(_parallel, "MIN_BYTES", 1 << 12)
    monkeypatch.setattr(_parallel, "_MIN_RANGE", 1 << 12)
    log = _write(tmp_path / "rag.jsonl", _varied_log(3))
    one, two = Aggregator(), Aggregator()
    one.feed_source(Source(str(log)), jobs=1)
    two.feed_source(Source(str(log)), jobs=2)
    assert render_json(one.result()) == render_json(two.result())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    picks=st.lists(st.integers(0, len(ODD_LINES)), max_size=30),
    durations=st.lists(st.floats(0, 1e6, allow_nan=False) | st.integers(0, 10**6), min_size=1,
                       max_size=40),
    seed=st.integers(0, 2**16),
)
def test_any_mix_of_lines_reads_the_same_both_ways(
    tmp_path_factory: pytest.TempPathFactory, picks: list[int], durations: list[float], seed: int
) -> None:
    rng = random.Random(seed)
    lines = [line for _ in range(6) for line in _request(rng)]
    lines += [_stage(rng.choice(["retrieval", "generation", "tool"]), ms) for ms in durations]
    lines += [([*ODD_LINES, OTLP_LINE])[i] for i in picks]
    rng.shuffle(lines)
    log = _write(tmp_path_factory.mktemp("mix") / "rag.jsonl", lines)
    _same(analyze([str(log)]), _reference([log]))


@given(st.lists(st.floats(-1e300, 1e300, allow_nan=False, allow_infinity=False), max_size=300),
       st.randoms(use_true_random=False))
def test_an_exact_sum_does_not_depend_on_order(values: list[float], rnd: random.Random) -> None:
    forward = ExactSum()
    for value in values:
        forward.add(value)
    shuffled = list(values)
    rnd.shuffle(shuffled)
    halves = ExactSum(), ExactSum()
    halves[0].extend(shuffled[: len(shuffled) // 2])
    halves[1].extend(shuffled[len(shuffled) // 2 :])
    halves[0].merge(halves[1])
    assert forward.value() == halves[0].value() == math.fsum(values)


def test_an_exact_sum_stays_exact_past_its_pending_bound() -> None:
    total = ExactSum()
    values = [0.1] * 10_000 + [1e16, 1.0, -1e16]
    for value in values:
        total.add(value)
    assert total.value() == math.fsum(values)
    assert len(total._parts) + len(total._pending) < 5_000
