"""The embedded offer index: in the process, saved to a directory with its Kafka offsets.

Exact search while the index is small, Faiss HNSW above ``approximate_above`` offers
(``mode="auto"``). Offers live in numbered *slots*; the HNSW graphs hold slot numbers.

- Exact search is one BLAS product of the queries with the held vectors: in this build it is
  about twice as fast as Faiss's ``IndexFlatIP`` at batch 64 on one thread (bench/retrieval.py).
- Deletes: a deleted or replaced offer's slot is marked dead. Exact search masks dead slots; HNSW
  (which has no ``remove_ids``) skips them through an id selector. Once a quarter of the slots
  are dead the slots are compacted and the graphs rebuilt without them, as before every save, so
  a saved index holds no dead slots.
- Category filters: each category prefix keeps the set of live slots under it. A filtered search
  scores the slots of that subset directly (exact, and cheaper than a selector that visits every
  vector) unless the index is approximate and the subset is large, where HNSW searches with a
  selector.
- Save: every file goes to a fresh directory with a manifest of SHA-256 sums, which is then
  swapped in by rename, so a crash mid-save leaves the previous state whole. A damaged or
  mismatched file is a clear :class:`OfferIndexError` when the index is opened.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.offer_index import (
    Hit,
    IndexedOffer,
    OfferIndexError,
    Offsets,
    category_prefixes,
    checked_queries,
    normalised,
)

__all__ = ["FORMAT", "FaissIndex"]

FORMAT = 1
_MANIFEST = "manifest.json"
_OFFERS = "offers.parquet"
_HNSW_NEIGHBOURS = 32


class FaissIndex:
    """The embedded engine of :class:`core.offer_index.OfferIndex`.

    ``mode``: ``"exact"``, ``"hnsw"`` or ``"auto"`` (exact up to ``approximate_above`` live
    offers, then HNSW). ``ef_search`` trades HNSW recall for latency. ``path`` is where
    :meth:`save` writes; :meth:`open` reads it back.
    """

    def __init__(
        self,
        spaces: Mapping[str, int],
        *,
        path: str | os.PathLike[str] | None = None,
        mode: str = "auto",
        approximate_above: int = 200_000,
        ef_search: int = 128,
        ef_construction: int = 80,
        threads: int | None = None,
    ) -> None:
        if mode not in ("exact", "hnsw", "auto"):
            raise ValueError(f"mode must be exact, hnsw or auto, not {mode!r}")
        if not spaces or any(int(dimension) < 1 for dimension in spaces.values()):
            raise ValueError(f"spaces must name at least one space with a positive dimension, got {dict(spaces)}")
        if threads is not None:
            faiss.omp_set_num_threads(threads)
        self.spaces = {name: int(dimension) for name, dimension in spaces.items()}
        self.path = Path(path) if path is not None else None
        self.mode = mode
        self.approximate_above = approximate_above
        self.ef_search = ef_search
        self.ef_construction = ef_construction
        self._approximate = mode == "hnsw"
        self._vectors = {name: np.zeros((0, dimension), np.float32) for name, dimension in self.spaces.items()}
        self._offer_ids: list[str | None] = []  # slot -> offer id, None where the slot is dead
        self._categories: list[str] = []
        self._products: list[str | None] = []
        self._image_shas: list[str | None] = []
        self._listed_at: list[str | None] = []
        self._titles: list[str | None] = []
        self._slot_of: dict[str, int] = {}
        self._under: dict[str, set[int]] = {}  # category prefix -> live slots
        self._under_arrays: dict[str, np.ndarray] = {}  # the same, as sorted arrays, rebuilt on demand
        self._dead: set[int] = set()
        self._dead_array: np.ndarray | None = None
        self._alive = np.zeros(0, dtype=bool)  # slot -> holds a live offer (exact search masks the rest)
        # HNSW graphs by space; the exact path needs none (it scores the held vectors directly).
        self._indexes: dict[str, faiss.Index] = {}
        if self._approximate:
            self._indexes = {name: self._new_faiss(dimension) for name, dimension in self.spaces.items()}
        self._offsets: Offsets = {}

    # -- the contract ------------------------------------------------------------------------

    def upsert(self, offers: Sequence[IndexedOffer]) -> None:
        if not offers:
            return
        batch = {name: np.empty((len(offers), dimension), np.float32) for name, dimension in self.spaces.items()}
        for row, offer in enumerate(offers):
            missing = set(self.spaces) - set(offer.vectors)
            if missing:
                raise OfferIndexError(f"offer {offer.offer_id!r} has no vector for space(s) {sorted(missing)}")
            for name, dimension in self.spaces.items():
                batch[name][row] = normalised(
                    offer.vectors[name], dimension=dimension, what=f"offer {offer.offer_id!r}"
                )[0]
        # A later copy of the same offer in one batch wins, as it would have in two batches.
        last_row = {offer.offer_id: row for row, offer in enumerate(offers)}
        rows = sorted(last_row.values())
        self.delete(last_row)
        first = len(self._offer_ids)
        self._grow(first + len(rows))
        for slot, row in enumerate(rows, start=first):
            offer = offers[row]
            self._offer_ids.append(offer.offer_id)
            self._categories.append(offer.category)
            self._products.append(offer.product)
            self._image_shas.append(offer.image_sha)
            self._listed_at.append(offer.listed_at)
            self._titles.append(offer.title)
            self._slot_of[offer.offer_id] = slot
            for prefix in category_prefixes(offer.category):
                self._under.setdefault(prefix, set()).add(slot)
                self._under_arrays.pop(prefix, None)
        slots = np.arange(first, first + len(rows), dtype=np.int64)
        self._alive[first : first + len(rows)] = True
        for name in self.spaces:
            self._vectors[name][first : first + len(rows)] = batch[name][rows]
            if self._approximate:
                self._indexes[name].add_with_ids(self._vectors[name][first : first + len(rows)], slots)
        if self.mode == "auto" and not self._approximate and len(self._slot_of) > self.approximate_above:
            self._approximate = True
            self._rebuild()

    def delete(self, offer_ids: Iterable[str]) -> int:
        slots = [self._slot_of.pop(offer_id) for offer_id in offer_ids if offer_id in self._slot_of]
        if not slots:
            return 0
        for slot in slots:
            self._offer_ids[slot] = None
            for prefix in category_prefixes(self._categories[slot]):
                self._under[prefix].discard(slot)
                self._under_arrays.pop(prefix, None)
        self._alive[slots] = False
        self._dead.update(slots)
        self._dead_array = None
        if len(self._dead) > len(self._offer_ids) // 4:
            self._rebuild()
        return len(slots)

    def get(self, offer_id: str) -> IndexedOffer | None:
        slot = self._slot_of.get(offer_id)
        if slot is None:
            return None
        return IndexedOffer(
            offer_id=offer_id,
            category=self._categories[slot],
            vectors={name: self._vectors[name][slot].copy() for name in self.spaces},
            product=self._products[slot],
            image_sha=self._image_shas[slot],
            listed_at=self._listed_at[slot],
            title=self._titles[slot],
        )

    def titles(self) -> Iterator[tuple[str, str]]:
        for offer_id, slot in list(self._slot_of.items()):
            title = self._titles[slot]
            if title:
                yield offer_id, title

    def count(self, category: str | None = None) -> int:
        if category is None:
            return len(self._slot_of)
        return len(self._under.get(category, ()))

    def __len__(self) -> int:
        return len(self._slot_of)

    def search(self, space: str, queries: np.ndarray, *, k: int, category: str | None = None) -> list[list[Hit]]:
        queries = checked_queries(self.spaces, space, queries, k)
        if category is not None:
            subset = self._subset(category)
            if len(subset) == 0:
                return [[] for _ in range(len(queries))]
            if not self._approximate or len(subset) <= 4 * self.ef_search * max(k, 1):
                return self._score_subset(space, queries, subset, k)
            return self._faiss_search(space, queries, min(k, len(subset)), faiss.IDSelectorBatch(subset))
        if not self._slot_of:
            return [[] for _ in range(len(queries))]
        if not self._approximate:
            return self._score_all(space, queries, min(k, len(self._slot_of)))
        selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(self._dead_slots())) if self._dead else None
        return self._faiss_search(space, queries, min(k, len(self._slot_of)), selector)

    def offsets(self) -> Offsets:
        return dict(self._offsets)

    def save(self, offsets: Offsets) -> None:
        if self.path is None:
            raise OfferIndexError("this index was made without a path to save to")
        if self._dead:
            self._rebuild()
        live = np.fromiter(self._slot_of.values(), dtype=np.int64, count=len(self._slot_of))
        live.sort()
        staging = self.path.with_name(f".{self.path.name}.saving-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        files: dict[str, str] = {}
        table = pa.table(
            {
                "offer_id": [self._offer_ids[slot] for slot in live],
                "category": [self._categories[slot] for slot in live],
                "product": [self._products[slot] for slot in live],
                "image_sha": [self._image_shas[slot] for slot in live],
                "listed_at": [self._listed_at[slot] for slot in live],
                "title": [self._titles[slot] for slot in live],
            },
            schema=pa.schema(
                [(name, pa.string()) for name in ("offer_id", "category", "product", "image_sha", "listed_at", "title")]
            ),
        )
        pq.write_table(table, staging / _OFFERS)
        files[_OFFERS] = _sha256(staging / _OFFERS)
        for name in self.spaces:
            vectors_file = f"vectors-{name}.npy"
            np.save(staging / vectors_file, self._vectors[name][live], allow_pickle=False)
            files[vectors_file] = _sha256(staging / vectors_file)
            if self._approximate:
                # Saved slots are renumbered 0..n-1 in slot order; the graph was just rebuilt
                # over live slots only, which are exactly 0..n-1 after _rebuild's compaction.
                graph_file = f"graph-{name}.faiss"
                faiss.write_index(self._indexes[name], str(staging / graph_file))
                files[graph_file] = _sha256(staging / graph_file)
        manifest = {
            "format": FORMAT,
            "engine": "faiss",
            "spaces": self.spaces,
            "approximate": self._approximate,
            "count": len(live),
            "files": files,
            "offsets": [[topic, partition, offset] for (topic, partition), offset in sorted(offsets.items())],
        }
        (staging / _MANIFEST).write_text(json.dumps(manifest, indent=1))
        _fsync_directory(staging)
        previous = self.path.with_name(f".{self.path.name}.previous-{os.getpid()}")
        if self.path.exists():
            self.path.rename(previous)
        staging.rename(self.path)
        shutil.rmtree(previous, ignore_errors=True)
        self._offsets = dict(offsets)

    def close(self) -> None:
        self._indexes.clear()

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        spaces: Mapping[str, int] | None = None,
        **options: object,
    ) -> FaissIndex:
        """The index saved at ``path``, or a new empty one there when nothing was saved yet
        (``spaces`` is then required). A damaged save is an :class:`OfferIndexError` naming the file."""
        path = Path(path)
        manifest_file = path / _MANIFEST
        if not manifest_file.exists():
            if path.exists() and any(path.iterdir()):
                raise OfferIndexError(f"{path} holds files but no {_MANIFEST}: not an offer index, or a damaged one")
            if spaces is None:
                raise OfferIndexError(f"no offer index at {path}, and no spaces given to start one")
            return cls(spaces, path=path, **options)  # type: ignore[arg-type]
        try:
            manifest = json.loads(manifest_file.read_text())
        except (OSError, ValueError) as error:
            raise OfferIndexError(f"{manifest_file} is unreadable: {error}") from error
        if manifest.get("format") != FORMAT or manifest.get("engine") != "faiss":
            raise OfferIndexError(
                f"{path} is offer index format {manifest.get('format')!r} ({manifest.get('engine')!r}); "
                f"this catstream reads faiss format {FORMAT}: rebuild the index from the stream"
            )
        saved_spaces = {name: int(dimension) for name, dimension in manifest["spaces"].items()}
        if spaces is not None and dict(spaces) != saved_spaces:
            raise OfferIndexError(f"{path} holds spaces {saved_spaces}, but {dict(spaces)} were asked for")
        for name, digest in manifest["files"].items():
            file = path / name
            if not file.exists():
                raise OfferIndexError(f"{file} is missing from the saved offer index")
            if _sha256(file) != digest:
                raise OfferIndexError(f"{file} does not match its checksum in {_MANIFEST}: the saved index is damaged")
        index = cls(saved_spaces, path=path, **options)  # type: ignore[arg-type]
        table = pq.read_table(path / _OFFERS).to_pydict()
        count = int(manifest["count"])
        if len(table["offer_id"]) != count:
            raise OfferIndexError(f"{path / _OFFERS} holds {len(table['offer_id'])} offers, the manifest says {count}")
        index._offer_ids = list(table["offer_id"])
        index._categories = list(table["category"])
        index._products = list(table["product"])
        index._image_shas = list(table["image_sha"])
        index._listed_at = list(table["listed_at"])
        # Saves from before titles were kept have none: those offers have no lexical matches.
        index._titles = list(table["title"]) if "title" in table else [None] * count
        index._slot_of = {offer_id: slot for slot, offer_id in enumerate(index._offer_ids) if offer_id is not None}
        index._alive = np.ones(count, dtype=bool)
        for slot, category in enumerate(index._categories):
            for prefix in category_prefixes(category):
                index._under.setdefault(prefix, set()).add(slot)
        index._approximate = bool(manifest["approximate"]) or index.mode == "hnsw"
        for name in saved_spaces:
            vectors = np.load(path / f"vectors-{name}.npy", allow_pickle=False)
            if vectors.shape != (count, saved_spaces[name]):
                raise OfferIndexError(
                    f"{path}/vectors-{name}.npy has shape {vectors.shape}, expected {(count, saved_spaces[name])}"
                )
            index._vectors[name] = np.ascontiguousarray(vectors, dtype=np.float32)
        graphs = all(f"graph-{name}.faiss" in manifest["files"] for name in saved_spaces)
        if index._approximate and graphs:
            for name in saved_spaces:
                graph = faiss.read_index(str(path / f"graph-{name}.faiss"))
                if graph.ntotal != count:
                    raise OfferIndexError(f"{path}/graph-{name}.faiss holds {graph.ntotal} vectors, expected {count}")
                index._indexes[name] = graph
                index._tune(graph)
        else:
            index._rebuild()
        index._offsets = {(topic, int(partition)): int(offset) for topic, partition, offset in manifest["offsets"]}
        return index

    # -- internals -----------------------------------------------------------------------------

    def _new_faiss(self, dimension: int) -> faiss.Index:
        graph = faiss.IndexHNSWFlat(dimension, _HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = self.ef_construction
        graph.hnsw.efSearch = self.ef_search
        return faiss.IndexIDMap2(graph)

    def _tune(self, index: faiss.Index) -> None:
        inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
        if isinstance(inner, faiss.IndexHNSW):
            inner.hnsw.efSearch = self.ef_search

    def _grow(self, size: int) -> None:
        for name, vectors in self._vectors.items():
            if len(vectors) < size:
                grown = np.zeros((max(size, 2 * len(vectors), 1024), self.spaces[name]), np.float32)
                grown[: len(vectors)] = vectors
                self._vectors[name] = grown
        if len(self._alive) < size:
            alive = np.zeros(max(size, 2 * len(self._alive), 1024), dtype=bool)
            alive[: len(self._alive)] = self._alive
            self._alive = alive

    def _rebuild(self) -> None:
        """Compact the slots to the live offers and build every Faiss index afresh."""
        live = sorted(self._slot_of.values())
        self._offer_ids = [self._offer_ids[slot] for slot in live]
        self._categories = [self._categories[slot] for slot in live]
        self._products = [self._products[slot] for slot in live]
        self._image_shas = [self._image_shas[slot] for slot in live]
        self._listed_at = [self._listed_at[slot] for slot in live]
        self._titles = [self._titles[slot] for slot in live]
        for name in self.spaces:
            self._vectors[name] = np.ascontiguousarray(self._vectors[name][live])
        self._slot_of = {offer_id: slot for slot, offer_id in enumerate(self._offer_ids) if offer_id is not None}
        self._under = {}
        for slot, category in enumerate(self._categories):
            for prefix in category_prefixes(category):
                self._under.setdefault(prefix, set()).add(slot)
        self._under_arrays = {}
        self._dead = set()
        self._dead_array = None
        self._alive = np.ones(len(live), dtype=bool)
        self._indexes = {}
        if not self._approximate:
            return
        slots = np.arange(len(live), dtype=np.int64)
        for name, dimension in self.spaces.items():
            index = self._new_faiss(dimension)
            if len(live):
                index.add_with_ids(self._vectors[name][: len(live)], slots)
            self._indexes[name] = index

    def _subset(self, category: str) -> np.ndarray:
        subset = self._under_arrays.get(category)
        if subset is None:
            subset = np.fromiter(self._under.get(category, ()), dtype=np.int64)
            subset.sort()
            self._under_arrays[category] = subset
        return subset

    def _dead_slots(self) -> np.ndarray:
        if self._dead_array is None:
            self._dead_array = np.fromiter(self._dead, dtype=np.int64, count=len(self._dead))
        return self._dead_array

    def _score_all(self, space: str, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """Exact search: one BLAS product against every held vector, dead slots masked (measured
        about twice as fast as Faiss's IndexFlatIP in this build, bench/retrieval.py)."""
        held = len(self._offer_ids)
        scores = queries @ self._vectors[space][:held].T  # (N, held)
        if self._dead:
            scores[:, ~self._alive[:held]] = -np.inf
        return self._top(scores, np.arange(held), k)

    def _score_subset(self, space: str, queries: np.ndarray, subset: np.ndarray, k: int) -> list[list[Hit]]:
        return self._top(queries @ self._vectors[space][subset].T, subset, k)  # (N, S)

    def _top(self, scores: np.ndarray, slots: np.ndarray, k: int) -> list[list[Hit]]:
        """The ``k`` best columns of ``scores`` ``(N, S)`` per row as hits; column ``c`` is slot ``slots[c]``."""
        subset = slots
        k = min(k, len(subset))
        top = (
            np.argpartition(-scores, k - 1, axis=1)[:, :k]
            if k < len(subset)
            else np.tile(np.arange(len(subset)), (len(scores), 1))
        )
        results = []
        for row in range(len(scores)):
            order = top[row][np.argsort(-scores[row, top[row]], kind="stable")]
            results.append(
                [
                    self._hit(int(subset[column]), float(scores[row, column]))
                    for column in order
                    if scores[row, column] > -np.inf
                ]
            )
        return results

    def _faiss_search(
        self, space: str, queries: np.ndarray, k: int, selector: faiss.IDSelector | None
    ) -> list[list[Hit]]:
        parameters = faiss.SearchParametersHNSW(efSearch=max(self.ef_search, k))  # type: ignore[attr-defined]
        if selector is not None:
            parameters.sel = selector
        scores, slots = self._indexes[space].search(queries, k, params=parameters)
        return [
            [self._hit(int(slot), float(score)) for score, slot in zip(row_scores, row_slots, strict=True) if slot >= 0]
            for row_scores, row_slots in zip(scores, slots, strict=True)
        ]

    def _hit(self, slot: int, score: float) -> Hit:
        offer_id = self._offer_ids[slot]
        assert offer_id is not None, "a search returned a dead slot"
        return Hit(
            offer_id=offer_id,
            score=score,
            category=self._categories[slot],
            product=self._products[slot],
            image_sha=self._image_shas[slot],
            listed_at=self._listed_at[slot],
        )


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_directory(directory: Path) -> None:
    for file in directory.iterdir():
        with file.open("rb") as stream:
            os.fsync(stream.fileno())
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
