"""Collections past one machine: an index's vectors, paths and labels in Milvus, queried by `similar` and `serve`.

`transfer index -o DIR --milvus URI` copies an index (built as usual, vectors on disk) into a Milvus collection and
records in DIR/index.json where it went; `SearchIndex.load` then answers through the collection (`--exact` still
searches the local vectors). URI is what pymilvus takes: `http://host:19530` for a server or cluster (its token, if
any, from the MILVUS_TOKEN environment variable, never from the command line or index.json), or a local `.db` file
for milvus-lite, the embedded Milvus that speaks the same client API (tests and trials).

Identity as for a local index: the collection carries the index's model record (ONNX SHA-256 or run fingerprint,
weights, layer), its row count, dimension and a build id, in the collection property `transfer.index`; a collection
whose identity differs from index.json (another model, an older push, someone else's collection) is refused, never
searched, and a push never drops a collection that `transfer` did not create. A push re-creates the collection whole
(rows keep the index's row numbers as primary keys) from the stored vectors, a few thousand rows at a time.
Imports no torch; pymilvus only when a database is used (`pip install 'transfer[milvus]'`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from transfer.core.errors import DataError, OptionError, first_line
from transfer.core.progress import SILENT, Progress
from transfer.serving.index_checks import image_status, label_text

IDENTITY_PROPERTY = "transfer.index"
INSERT_ROWS = 2_000  # rows per insert call: 10 MB of 1,280-dim vectors
MAX_TEXT = 65_535  # Milvus's longest VARCHAR
NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")
SERVER_SCHEMES = ("http://", "https://", "tcp://", "grpc://", "unix:")


def database_uri(uri: str) -> str:
    """A server address as given; anything else is a milvus-lite file, made absolute (index.json is read from any
    working directory). A lite file must end in .db, as milvus-lite requires."""
    if uri.startswith(SERVER_SCHEMES):
        return uri
    if not uri.endswith(".db"):
        raise OptionError(f"--milvus {uri}: give a server address (http://host:19530) or a milvus-lite file ending "
                          "in .db")
    return str(Path(uri).resolve())


def collection_name(name: str, where: str = "--collection") -> str:
    """A name Milvus accepts (letters, digits, underscores; not starting with a digit; at most 255)."""
    if not NAME_PATTERN.fullmatch(name):
        raise OptionError(f"{where} {name!r}: Milvus names hold letters, digits and underscores, start with a letter "
                          "or underscore, and have at most 255 characters")
    return name


def default_collection(folder: str | os.PathLike) -> str:
    """The index folder's name made into a collection name: `photos.idx` -> `photos_idx`."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", Path(folder).resolve().name)[:255] or "transfer_index"
    return name if not name[0].isdigit() else f"_{name[:254]}"


def connect(uri: str):
    """A MilvusClient for `uri`; a missing client library or an unreachable server is one line."""
    try:
        from pymilvus import MilvusClient
    except ImportError:
        raise DataError("Milvus needs its client: pip install 'transfer[milvus]' (pymilvus, and milvus-lite for a "
                        ".db file)") from None
    try:
        return MilvusClient(uri=uri, token=os.environ.get("MILVUS_TOKEN", ""))
    except Exception as exc:  # pymilvus raises MilvusException, grpc and OS errors alike
        raise DataError(f"Milvus at {uri}: cannot connect ({first_line(exc)[:300]})") from None


def identity(record: dict, build: str) -> dict:
    """What a collection must match to be searched for this index."""
    return {"build": build, "count": record["count"], "dim": record["dim"], "model": record["model"]}


def _stored_identity(client, collection: str) -> dict | None:
    """The identity a collection carries, or None when `transfer` did not write it."""
    properties = client.describe_collection(collection).get("properties") or {}
    try:
        return json.loads(properties[IDENTITY_PROPERTY])
    except (KeyError, TypeError, ValueError):
        return None


def push(record: dict, vectors: np.ndarray, uri: str, collection: str, progress: Progress = SILENT) -> dict:
    """Copy an index (its index.json `record` and unit `vectors`, memory-mapped) into `collection` at `uri`,
    replacing a collection an earlier push made; returns what index.json keeps under "database"."""
    client = connect(uri)
    from pymilvus import DataType, MilvusClient

    build = uuid.uuid4().hex
    try:
        if client.has_collection(collection):
            if _stored_identity(client, collection) is None:
                raise DataError(f"--collection {collection}: Milvus at {uri} already holds a collection of that name "
                                "that `transfer index` did not write; it is not replaced: choose another name")
            client.drop_collection(collection)
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)  # the row in vectors.npy
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=record["dim"])
        schema.add_field("path", DataType.VARCHAR, max_length=MAX_TEXT)
        schema.add_field("label", DataType.VARCHAR, max_length=MAX_TEXT)
        schema.add_field("size", DataType.INT64)
        schema.add_field("mtime_ns", DataType.INT64)
        index_params = client.prepare_index_params()
        index_params.add_index(field_name="vector", index_type="AUTOINDEX", metric_type="IP")
        with _quiet_lite_server():
            client.create_collection(collection, schema=schema, index_params=index_params,
                                     properties={IDENTITY_PROPERTY: json.dumps(identity(record, build))})
        with progress.task(f"copying into Milvus collection {collection}", total=record["count"],
                           unit="vectors") as advance:
            for begin in range(0, record["count"], INSERT_ROWS):
                client.insert(collection, _rows(record, vectors, begin, min(record["count"], begin + INSERT_ROWS)))
                advance(min(INSERT_ROWS, record["count"] - begin))
        client.flush(collection)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"Milvus at {uri}: writing {collection} failed ({first_line(exc)[:300]})") from None
    finally:
        client.close()
    return {"kind": "milvus", "uri": uri, "collection": collection, "build": build}


@contextmanager
def _quiet_lite_server():
    """milvus-lite's in-process server does not implement AllocTimestamp, which create_collection asks for and then
    does without; grpc logs that as an ERROR with a traceback on stderr. Silenced for this one call, then restored."""
    logger = logging.getLogger("grpc._server")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _rows(record: dict, vectors: np.ndarray, begin: int, end: int) -> list[dict]:
    block = np.asarray(vectors[begin:end], dtype=np.float32)
    labels, classes = record.get("labels"), record.get("classes") or []
    stamps = record.get("stamps") or [[-1, -1]] * record["count"]
    return [{"id": row, "vector": block[row - begin], "path": record["paths"][row],
             "label": (label_text(labels[row], classes) or "") if labels and classes else "",
             "size": int(stamps[row][0]), "mtime_ns": int(stamps[row][1])} for row in range(begin, end)]


class MilvusIndex:
    """An index's collection, checked to be the one index.json names, searched for the nearest rows."""

    def __init__(self, record: dict, where: str):
        database = record["database"]
        self.uri, self.collection = database["uri"], database["collection"]
        self.client = connect(self.uri)
        try:
            found = (_stored_identity(self.client, self.collection)
                     if self.client.has_collection(self.collection) else None)
        except Exception as exc:
            raise DataError(f"{where}: Milvus at {self.uri} ({first_line(exc)[:300]})") from None
        if found is None:
            raise DataError(f"{where}: Milvus at {self.uri} holds no collection {self.collection} written by "
                            "`transfer index`; push it again with `transfer index -o DIR --milvus URI`")
        if found != identity(record, database["build"]):
            raise DataError(f"{where}: the Milvus collection {self.collection} holds another build of this index (or "
                            "another model's vectors); push it again with `transfer index -o DIR --milvus URI`")

    def nearest_many(self, queries: np.ndarray, k: int) -> list[list[dict]]:
        """Each query's k best rows by inner product (cosine on unit vectors), as `SearchIndex` hits."""
        try:
            answers = self.client.search(self.collection, data=[row for row in queries], limit=k,
                                         output_fields=["path", "label", "size", "mtime_ns"],
                                         search_params={"metric_type": "IP"})
        except Exception as exc:
            raise DataError(f"Milvus at {self.uri}: searching {self.collection} failed ({first_line(exc)[:300]})"
                            ) from None
        return [[{"row": int(hit["id"]), "path": hit["entity"]["path"], "score": float(hit["distance"]),
                  "label": hit["entity"]["label"] or None,
                  "status": image_status(hit["entity"]["path"], _stamp(hit["entity"]))}
                 for hit in hits] for hits in answers]


def _stamp(entity: dict) -> list[int] | None:
    """The file stamp a row was stored with; None (not known, so never 'changed') for an index without stamps."""
    return None if entity["size"] < 0 else [entity["size"], entity["mtime_ns"]]
