"""``rag-instrument sweep``: latency and recall@k of a Milvus collection per search parameter.

::

    rag-instrument sweep ./milvus.db --collection docs --param nprobe --values 1,4,16,64
    rag-instrument sweep http://localhost:19530 --collection docs --param ef --values 16,64,128

Queries are vectors sampled from the collection (``--queries N``, seeded) or read from a JSON
file holding a list of vectors (``--queries-file``). The exact answer for recall comes from
``--exact-collection`` (a FLAT copy of the data) or, by default, from a brute-force search
over the collection's vectors computed here (read once; for up to ``--max-exact`` rows).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rag_instrument._sanitize import redact_text
from rag_instrument.vector import SweepRow, format_table, sweep

__all__ = ["add_parser", "exact_search", "run"]

_HINT = "rag-instrument sweep needs pymilvus: pip install 'rag_instrument[milvus]'"


def _values(text: str) -> list[Any]:
    out: list[Any] = []
    for part in text.split(","):
        item = part.strip()
        if not item:
            continue
        try:
            out.append(int(item))
        except ValueError:
            try:
                out.append(float(item))
            except ValueError:
                out.append(item)
    if not out:
        raise argparse.ArgumentTypeError("--values needs at least one value, e.g. 1,4,16,64")
    text_values = [v for v in out if isinstance(v, str)]
    if text_values and len(text_values) < len(out):  # "1,x": a typo, which Milvus ignores
        raise argparse.ArgumentTypeError(
            f"--values mixes numbers and text ({', '.join(map(repr, text_values[:3]))}): "
            "give numbers only (1,4,16,64) or text only"
        )
    return out


def _recall(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a recall above 0 and at most 1, got {text!r}")
    return value


def _name(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a name, got an empty one")
    return text.strip()


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_parser(subparsers: Any) -> None:
    """Register ``sweep``."""
    parser = subparsers.add_parser(
        "sweep",
        help="latency and recall@k of a Milvus collection for each value of a search parameter",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("uri", help="Milvus URI (http://host:19530) or a Milvus Lite file (.db)")
    parser.add_argument(
        "--collection", required=True, type=_name, help="the collection to search"
    )
    parser.add_argument(
        "--param", required=True, type=_name, help="the search parameter to vary (nprobe, ef, ...)"
    )
    parser.add_argument(
        "--values", required=True, type=_values, help="comma-separated values, e.g. 1,4,16,64"
    )
    parser.add_argument("--field", help="the vector field (default: the only one)")
    parser.add_argument(
        "-k", "--limit", dest="k", type=_positive, default=10, help="k of recall@k (default 10)"
    )
    parser.add_argument(
        "--queries", type=_positive, default=100, help="query vectors to sample (default 100)"
    )
    parser.add_argument("--queries-file", type=Path, help="a JSON file with a list of vectors")
    parser.add_argument(
        "--exact-collection", help="a FLAT copy of the collection giving the exact answers"
    )
    parser.add_argument(
        "--max-exact",
        type=_positive,
        default=200_000,
        help="most rows to read for the brute-force exact answers (default 200000)",
    )
    parser.add_argument("--filter", default="", help="a filter expression for every search")
    parser.add_argument("--seed", type=int, default=0, help="query sampling seed (default 0)")
    parser.add_argument(
        "--target-recall", type=_recall, default=0.95, help="recall to reach (default 0.95)"
    )
    parser.add_argument("--token", default="", help="Milvus token (user:password)")
    parser.add_argument("--format", choices=("table", "json"), default="table")
    parser.set_defaults(func=run)


def _distance(metric: str) -> Callable[[Sequence[float], Sequence[float]], float]:
    """Smaller is nearer, for each Milvus float metric."""
    if metric == "IP":
        return lambda a, b: -math.fsum(x * y for x, y in zip(a, b, strict=True))
    if metric == "COSINE":

        def cosine(a: Sequence[float], b: Sequence[float]) -> float:
            dot = math.fsum(x * y for x, y in zip(a, b, strict=True))
            norm = math.sqrt(math.fsum(x * x for x in a)) * math.sqrt(math.fsum(y * y for y in b))
            return -dot / norm if norm else 0.0

        return cosine
    if metric == "L2":
        return lambda a, b: math.fsum((x - y) ** 2 for x, y in zip(a, b, strict=True))
    raise ValueError(f"brute-force exact search does not support the {metric!r} metric")


def exact_search(
    rows: Sequence[tuple[Any, Sequence[float]]], metric: str, k: int
) -> Callable[[Sequence[float]], list[Any]]:
    """The exact ``k`` nearest ids among ``rows`` (``(id, vector)``), by brute force.

    NumPy does the arithmetic when it is installed (pymilvus depends on it).
    """
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - pymilvus always brings NumPy
        distance = _distance(metric)

        def slow(query: Sequence[float]) -> list[Any]:
            scored = sorted(rows, key=lambda row: distance(query, row[1]))
            return [row_id for row_id, _ in scored[:k]]

        return slow
    _distance(metric)  # validates the metric
    ids = [row_id for row_id, _ in rows]
    matrix = np.asarray([vector for _, vector in rows], dtype=np.float64)
    norms = np.linalg.norm(matrix, axis=1)

    def fast(query: Sequence[float]) -> list[Any]:
        q = np.asarray(query, dtype=np.float64)
        if metric == "L2":
            scores = ((matrix - q) ** 2).sum(axis=1)
        elif metric == "IP":
            scores = -(matrix @ q)
        else:
            denominator = norms * (np.linalg.norm(q) or 1.0)
            denominator[denominator == 0] = 1.0
            scores = -(matrix @ q) / denominator
        order = np.argsort(scores, kind="stable")[:k]
        return [ids[int(i)] for i in order]

    return fast


def _schema(client: Any, collection: str, wanted: str | None) -> tuple[str, str, str, int | None]:
    """``(primary field, vector field, metric, its dimensions if known)`` of the collection."""
    description = client.describe_collection(collection)
    primary, vectors = "id", []
    dims: dict[str, int] = {}
    for field in description.get("fields", ()):
        type_name = getattr(field.get("type"), "name", str(field.get("type")))
        if field.get("is_primary"):
            primary = field["name"]
        elif "VECTOR" in type_name.upper():
            vectors.append(field["name"])
            dim = (field.get("params") or {}).get("dim")
            if isinstance(dim, int) or (isinstance(dim, str) and dim.isdigit()):
                dims[field["name"]] = int(dim)
    if wanted is None:
        if len(vectors) != 1:
            raise ValueError(f"the collection has vector fields {vectors}: choose one with --field")
        wanted = vectors[0]
    elif wanted not in vectors:
        raise ValueError(f"{wanted!r} is not a vector field of {collection!r} ({vectors})")
    metric = "L2"
    for index_name in client.list_indexes(collection, field_name=wanted) or ():
        info = client.describe_index(collection, index_name)
        if info.get("field_name") == wanted and info.get("metric_type"):
            metric = str(info["metric_type"])
    return primary, wanted, metric, dims.get(wanted)


def _read_rows(
    client: Any, collection: str, primary: str, field: str, limit: int, expr: str
) -> list[tuple[Any, list[float]]]:
    rows: list[tuple[Any, list[float]]] = []
    iterator = client.query_iterator(
        collection, batch_size=1000, filter=expr, output_fields=[primary, field]
    )
    try:
        while len(rows) <= limit:
            batch = iterator.next()
            if not batch:
                break
            rows.extend((row[primary], [float(x) for x in row[field]]) for row in batch)
    finally:
        iterator.close()
    if len(rows) > limit:
        raise ValueError(
            f"{collection!r} has more than {limit} rows: pass --exact-collection (a FLAT copy) "
            "or raise --max-exact"
        )
    return rows


def run(args: argparse.Namespace) -> int:
    """Run the sweep; print the table (or JSON). Exit status 2 on bad input."""
    try:
        from pymilvus import MilvusClient
    except ImportError:
        print(_HINT, file=sys.stderr)
        return 2
    try:
        from pymilvus.exceptions import MilvusException
    except ImportError:  # pragma: no cover - an older layout: its errors are Exceptions
        MilvusException = Exception
    # pymilvus logs each failed call with its traceback (its _log_rpc_error) before it
    # raises: the error is reported below, as one line.
    milvus_logger = logging.getLogger("pymilvus")
    level = milvus_logger.level
    milvus_logger.setLevel(logging.CRITICAL)
    try:
        rows = _run(args, MilvusClient)
    except (ValueError, OSError) as exc:
        print(f"rag-instrument sweep: {exc}", file=sys.stderr)
        return 2
    except MilvusException as exc:  # an unreachable server, a bad filter or parameter
        message = str(getattr(exc, "message", "") or exc).splitlines()[0] if str(exc) else ""
        print(
            f"rag-instrument sweep: Milvus at {redact_text(args.uri)}: "
            f"{message or type(exc).__name__}",
            file=sys.stderr,
        )
        return 2
    finally:
        milvus_logger.setLevel(level)
    if args.format == "json":
        print(json.dumps([row.as_dict() for row in rows], indent=2))
    else:
        print(format_table(rows, target_recall=args.target_recall))
    return 0


def _queries_from(path: Path) -> list[list[float]]:
    """The query vectors of ``--queries-file`` (a JSON list of lists of numbers)."""
    try:
        vectors = json.loads(path.read_text())
        return [list(map(float, vector)) for vector in vectors]
    except OSError as exc:
        raise ValueError(f"--queries-file {path}: {exc.strerror or exc}") from None
    except (ValueError, TypeError):
        raise ValueError(
            f"--queries-file {path}: expected a JSON list of vectors (lists of numbers)"
        ) from None


def _run(args: argparse.Namespace, client_class: Any) -> list[SweepRow]:
    if "://" not in args.uri and not Path(args.uri).exists():
        # A Milvus Lite file: opening a missing one creates it (an empty database left
        # behind by a typo). A sweep needs one with the collection in it.
        raise ValueError(f"no Milvus Lite database at {args.uri} (no such file)")
    client = client_class(args.uri, token=args.token) if args.token else client_class(args.uri)
    try:
        if not client.has_collection(args.collection):
            raise ValueError(f"no collection {args.collection!r} at {redact_text(args.uri)}")
        if args.exact_collection and not client.has_collection(args.exact_collection):
            raise ValueError(
                f"no collection {args.exact_collection!r} (--exact-collection) at "
                f"{redact_text(args.uri)}"
            )
        # A collection is searchable once loaded; Milvus Lite does not keep a collection
        # loaded across processes, and a server may have released it.
        for name in {args.collection, args.exact_collection} - {None}:
            client.load_collection(name)
        primary, field, metric, dim = _schema(client, args.collection, args.field)
        data: list[tuple[Any, list[float]]] | None = None
        if args.queries_file is not None:
            queries = _queries_from(args.queries_file)
            wrong = next((q for q in queries if dim is not None and len(q) != dim), None)
            if wrong is not None:
                raise ValueError(
                    f"--queries-file {args.queries_file}: a vector of {len(wrong)} numbers, "
                    f"where {field!r} holds vectors of {dim}"
                )
        else:
            data = _read_rows(client, args.collection, primary, field, args.max_exact, args.filter)
            if not data:
                raise ValueError(f"{args.collection!r} has no rows to sample queries from")
            rng = random.Random(args.seed)  # noqa: S311 - sampling, not security
            queries = [vector for _, vector in rng.sample(data, min(args.queries, len(data)))]
        if not queries:
            raise ValueError("no query vectors")
        k = args.k

        def search(query: list[float], **value: Any) -> list[Any]:
            hits = client.search(
                args.collection,
                data=[query],
                anns_field=field,
                limit=k,
                filter=args.filter,
                search_params={"metric_type": metric, "params": value},
            )
            return [hit[primary] for hit in hits[0]]

        ground_truth: Callable[[Any], Sequence[Any]]
        if args.exact_collection:
            exact_name = args.exact_collection

            def exact(query: list[float]) -> list[Any]:
                hits = client.search(
                    exact_name, data=[query], anns_field=field, limit=k, filter=args.filter
                )
                return [hit[primary] for hit in hits[0]]

            ground_truth = exact
        else:
            if data is None:
                data = _read_rows(
                    client, args.collection, primary, field, args.max_exact, args.filter
                )
            ground_truth = exact_search(data, metric, k)
        return sweep(search, args.param, args.values, queries, ground_truth=ground_truth, k=k)
    finally:
        client.close()
