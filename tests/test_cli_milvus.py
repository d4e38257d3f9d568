"""``rag-instrument sweep`` and the demo's Milvus Lite index, on a real milvus-lite."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("pymilvus")
from pymilvus import DataType, MilvusClient

import rag_instrument as ri
from rag_instrument.cli.__main__ import main
from rag_instrument.cli._demo_milvus import MilvusIndex
from rag_instrument.cli.sweep import exact_search
from rag_instrument.testing import capture

DIM = 16
IVF = ["--collection", "ivf", "--param", "nprobe"]


@pytest.fixture(scope="module")
def lite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = str(tmp_path_factory.mktemp("sweep") / "sweep.db")
    client = MilvusClient(path)
    rng = random.Random(99)
    vectors = [[rng.gauss(0, 1) for _ in range(DIM)] for _ in range(3000)]
    for name, index, extra in (("ivf", "IVF_FLAT", {"nlist": 64}), ("flat", "FLAT", {})):
        schema = MilvusClient.create_schema(auto_id=False)
        schema.add_field("pk", DataType.INT64, is_primary=True)
        schema.add_field("emb", DataType.FLOAT_VECTOR, dim=DIM)
        params = client.prepare_index_params()
        params.add_index("emb", index_type=index, metric_type="L2", params=extra)
        client.create_collection(name, schema=schema, index_params=params)
        client.insert(name, [{"pk": i, "emb": v} for i, v in enumerate(vectors)])
        client.flush(name)
    try:
        yield path
    finally:
        client.close()


def test_sweep_command_prints_the_table(lite: str, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["sweep", lite, *IVF, "--values", "1,16,64", "--queries", "30"])
    out = capsys.readouterr().out
    assert status == 0, out
    lines = out.splitlines()
    assert lines[0].split() == ["nprobe", "p50", "ms", "p95", "ms", "qps", "recall@10"]
    recalls = [float(line.split()[-1]) for line in lines[2:5]]
    assert [line.split()[0] for line in lines[2:5]] == ["1", "16", "64"]
    assert recalls == sorted(recalls)
    assert recalls[-1] > 0.95
    assert lines[-1].startswith("fastest nprobe reaching recall@10 >= 0.95: ")


def test_sweep_command_json_with_a_flat_copy_as_truth(
    lite: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    rng = random.Random(5)
    queries = tmp_path / "queries.json"
    queries.write_text(json.dumps([[rng.gauss(0, 1) for _ in range(DIM)] for _ in range(20)]))
    status = main(
        ["sweep", lite, *IVF, "--values", "2,64", "--queries-file", str(queries)]  # noqa: RUF005
        + ["--exact-collection", "flat", "--format", "json"]
    )
    rows = json.loads(capsys.readouterr().out)
    assert status == 0
    assert [row["value"] for row in rows] == [2, 64]
    assert all(row["queries"] == 20 and row["param"] == "nprobe" for row in rows)
    assert rows[0]["recall"] < rows[1]["recall"]


def test_query_vectors_of_the_wrong_size_are_named(
    lite: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # numpy's "operands could not be broadcast together" before.
    queries = tmp_path / "queries.json"
    queries.write_text(json.dumps([[0.5] * (DIM + 3)]))
    status = main(["sweep", lite, *IVF, "--values", "2", "--queries-file", str(queries)])
    assert status == 2
    assert f"a vector of {DIM + 3} numbers" in capsys.readouterr().err


def test_sweep_command_reports_bad_input(lite: str, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["sweep", lite, "--collection", "nope", "--param", "nprobe", "--values", "1"])
    assert status == 2
    assert "no collection 'nope'" in capsys.readouterr().err
    status = main(["sweep", lite, *IVF, "--values", "1", "--field", "missing"])
    assert status == 2
    assert "'missing' is not a vector field" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sweep", lite, "--collection", "ivf", "--param", "nprobe", "--values", ","])
    with pytest.raises(SystemExit):  # a typo among numbers, which Milvus would ignore
        main(["sweep", lite, "--collection", "ivf", "--param", "nprobe", "--values", "1,x"])
    assert "mixes numbers and text" in capsys.readouterr().err


def test_sweep_with_a_bad_filter_is_one_line_on_stderr(
    lite: str, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    # pymilvus logged the failed call with its traceback (to standard error, in a
    # terminal) before raising: the error is the CLI's one line.
    import logging

    caplog.set_level(logging.DEBUG, logger="pymilvus")
    status = main(["sweep", lite, *IVF, "--values", "1", "--filter", "id >>> 3"])
    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith("rag-instrument sweep: Milvus at ")
    assert err.count("\n") == 1
    assert not [r for r in caplog.records if r.name.startswith("pymilvus")]


def test_sweep_on_a_mistyped_lite_path_leaves_nothing_behind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    typo = tmp_path / "typo.db"
    status = main(["sweep", str(typo), *IVF, "--values", "1"])
    assert status == 2
    assert "no Milvus Lite database" in capsys.readouterr().err
    assert not typo.exists()  # opening a missing file created an empty database


@pytest.mark.parametrize("metric", ["L2", "IP", "COSINE"])
def test_brute_force_exact_search(metric: str) -> None:
    rows = [(1, [1.0, 0.0]), (2, [0.0, 1.0]), (3, [3.0, 3.0]), (4, [-1.0, -1.0])]
    nearest = exact_search(rows, metric, 2)([2.0, 2.0])
    expected = {"L2": [3, 1], "IP": [3, 1], "COSINE": [3, 1]}[metric]
    assert nearest[0] == expected[0]
    assert len(nearest) == 2
    with pytest.raises(ValueError, match="HAMMING"):
        exact_search(rows, "HAMMING", 2)


def test_demo_milvus_index_is_built_outside_the_loop_and_reports_vector_work() -> None:
    index = MilvusIndex(dimensions=4)  # as the demo does, before asyncio.run()
    directory = index._directory
    assert directory is not None
    assert directory.exists()

    async def use() -> list[int]:
        try:
            await index.add([1, 2, 3], [[1, 0, 0, 0], [0, 1, 0, 0], [0.9, 0.1, 0, 0]])
            async with ri.stage("retrieval"):
                return await index.search([1.0, 0.0, 0.0, 0.0], k=2)
        finally:
            index.close()

    with capture() as cap:
        ids = asyncio.run(use())
    assert ids == [1, 3]
    span = cap.span(f"search {index.collection}")
    assert span.attributes["rag.vector.index_type"] == "FLAT"
    assert span.attributes["rag.vector.metric"] == "IP"
    retrieval = cap.span("retrieval")
    assert span.parent is not None
    assert span.parent.span_id == retrieval.context.span_id  # across the worker thread
    assert cap.span(f"insert {index.collection}").attributes["rag.vector.row_count"] == 3
    assert cap.find_logs("retrieval completed")[0]["breakdown"]["vector"]["count"] == 1
    assert not directory.exists()


def test_demo_milvus_index_on_a_given_file_drops_its_collection(tmp_path: Path) -> None:
    path = str(tmp_path / "mine.db")
    index = MilvusIndex(path, dimensions=2)

    async def use() -> list[int]:
        try:
            await index.add([7], [[1.0, 0.0]])
            return await index.search([1.0, 0.0], k=1)
        finally:
            index.close()

    assert asyncio.run(use()) == [7]
    assert Path(path).exists()  # the caller's file is left alone
    client = MilvusClient(path)
    try:
        assert index.collection not in client.list_collections()
    finally:
        client.close()


def test_sweep_loads_a_collection_another_process_made(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Milvus Lite keeps no collection loaded across processes: the documented
    # `rag-instrument sweep ./milvus.db ...` failed with "call load() before search".
    import subprocess
    import sys
    import textwrap

    path = tmp_path / "other.db"
    code = textwrap.dedent(
        f"""
        import random
        from pymilvus import DataType, MilvusClient
        client = MilvusClient({str(path)!r})
        schema = MilvusClient.create_schema(auto_id=False)
        schema.add_field("pk", DataType.INT64, is_primary=True)
        schema.add_field("emb", DataType.FLOAT_VECTOR, dim={DIM})
        params = client.prepare_index_params()
        params.add_index("emb", index_type="IVF_FLAT", metric_type="L2", params={{"nlist": 8}})
        client.create_collection("docs", schema=schema, index_params=params)
        rng = random.Random(1)
        rows = [{{"pk": i, "emb": [rng.gauss(0, 1) for _ in range({DIM})]}} for i in range(300)]
        client.insert("docs", rows)
        client.flush("docs")
        client.close()
        """
    )
    made = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert made.returncode == 0, made.stderr
    args = ["sweep", str(path), "--collection", "docs", "--param", "nprobe", "--values", "1,8"]
    status = main([*args, "--queries", "10", "--format", "json"])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert [row["value"] for row in json.loads(out)] == [1, 8]


def test_sweep_command_refuses_bad_input_in_one_line(
    lite: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # An unreachable server, a missing exact collection, a bad queries file: exit 2 and a
    # line naming the culprit (a traceback and exit 1 before).
    cases = [
        (["http://127.0.0.1:1", *IVF, "--values", "1"], "Milvus at http://127.0.0.1:1"),
        ([lite, *IVF, "--values", "1", "--exact-collection", "nope"], "--exact-collection"),
    ]
    bad_file = tmp_path / "queries.json"
    bad_file.write_text("not json")
    cases.append(([lite, *IVF, "--values", "1", "--queries-file", str(bad_file)], str(bad_file)))
    for args, named in cases:
        assert main(["sweep", *args]) == 2, args
        err = capsys.readouterr().err
        assert named in err
        assert "Traceback" not in err
    for option in (["--target-recall", "1.5"], ["--target-recall", "nan"], ["--param", " "]):
        with pytest.raises(SystemExit) as exit_info:
            main(["sweep", lite, "--collection", "ivf", "--param", "nprobe", "--values", "1", *option])
        assert exit_info.value.code == 2
        assert option[0] in capsys.readouterr().err
