"""Tests for safedlora_app.core.data (offline, real data only)."""

import os
import tempfile

# Before datasets is imported: its cache location is read at import time, and offline mode
# makes an accidental hub call fail at once instead of hanging.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="hf-home-"))

import json  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image as PILImage  # noqa: E402

from safedlora_app import tasks  # noqa: E402
from safedlora_app.core import data as D  # noqa: E402

TOPIC_COUNTS = {"airline": 14657, "deflategate": 9303, "driverless": 4157, "coachella": 3748,
                "apple": 3598, "claritin": 1695, "other": 1000}


@pytest.fixture(scope="module")
def task():
    return tasks.load_task_data("")


@pytest.fixture(scope="module")
def pool(task):
    # An index column gives every row an identity (tweet texts repeat, e.g. retweets).
    return task.train.add_column("idx", list(range(len(task.train))))


def _col(ds, name):
    # Through arrow: plain column access in datasets 4 converts row by row (slow on 37k rows).
    return ds.with_format("arrow")[name].to_pylist()


def _write_csv(path, n=30):
    labels = ["pos", "neg", "meh"]
    rows = ["sentence,sentiment,city"]
    rows += [f'"tweet number {i}, ok",{labels[i % 3]},c{i % 2}' for i in range(n)]
    path.write_text("\n".join(rows) + "\n")
    return path


# ---------------------------------------------------------------- default tweets

def test_clean_text():
    assert D.clean_text("  a\x00b\x85\tc\r\n\r\n d\x7f\x9f ") == "a b c d"
    assert D.clean_text("plain text") == "plain text"


def test_default_tweets_counts():
    ds = D.load_default_tweets()
    assert D.load_default_tweets() is ds  # cached per process
    assert len(ds) == 38158
    assert ds.column_names == ["text", "label", "topic"]
    assert ds.features["label"].names == ["negative", "neutral", "positive"]
    assert Counter(ds["label"]) == {0: 16186, 1: 15018, 2: 6954}
    assert dict(Counter(ds["topic"])) == TOPIC_COUNTS
    assert set(TOPIC_COUNTS) == set(D.TOPICS)
    joined = "\n".join(ds["text"])
    assert not any(c in joined for c in "\x00\r\t\x85\x7f")


def test_topic_rules_first_match_wins():
    assert D.tweet_topic("My FLIGHT to #Coachella got cancelled") == "airline"
    assert D.tweet_topic("@Apple is this #DeflateGate?") == "deflategate"
    assert D.tweet_topic("new iPhone out") == "apple"
    assert D.tweet_topic("saw the google car today") == "other"


# ---------------------------------------------------------------- held-out split

def test_heldout_split_fixed_and_disjoint(task):
    assert task.input_column == "text" and task.label_names == ("negative", "neutral", "positive")
    # The corpus less its copies and its texts with conflicting labels (measured: 381 and 623 rows).
    assert task.removed == {"duplicates": 381, "conflicts": 623}
    assert len(task.test) == 1000 and len(task.train) == 38158 - 1000 - 381 - 623 and len(task.val) == 0
    # Disjoint rows: train + test is exactly the deduplicated corpus.
    distinct = {D.text_key(t) for t in D.load_default_tweets()["text"]}
    kept = [D.text_key(t) for t in [*task.train["text"], *task.test["text"]]]
    assert len(kept) == len(set(kept)) and set(kept) <= distinct
    # Stratified: class shares of the test set follow the deduplicated corpus (43% / 39% / 18%).
    labels = Counter([*task.train["label"], *task.test["label"]])
    expected = {c: 1000 * n / sum(labels.values()) for c, n in labels.items()}
    assert Counter(task.test["label"]) == pytest.approx(expected, abs=1)


def test_no_text_is_on_two_sides_and_conflicting_labels_are_dropped(tmp_path):
    """Issue #36: 70 of 2,000 test tweets had a copy in the training pool, one retweet 16 times in the test set."""
    rows = ["text,label"] + [f"text {i},{'ab'[i % 2]}" for i in range(40)]
    rows += ["RT same tweet,a"] * 16 + ["rt  Same Tweet ,a"] + ["torn,a", "torn,b", "Torn,a"]
    path = tmp_path / "copies.csv"
    path.write_text("\n".join(rows) + "\n")
    data = tasks.load_task_data(str(path), test_size=8, val_size=8)
    assert data.removed == {"duplicates": 16, "conflicts": 3}  # the 17 copies keep one; 'torn' has no one label
    sides = [[D.text_key(t) for t in part["text"]] for part in (data.train, data.val, data.test)]
    assert [len(side) for side in sides] == [25, 8, 8]
    assert len(set().union(*map(set, sides))) == 41 and "torn" not in set().union(*map(set, sides))
    assert "removed 16 duplicate rows and 3 rows" in data.describe()


def test_a_source_test_split_keeps_its_texts_and_the_training_split_loses_them(tmp_path):
    splits = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["seen in test", "only train", "x", "y"], "label": [0, 1, 0, 1]}),
        "test": datasets.Dataset.from_dict({"text": ["Seen in test", "only test"], "label": [0, 1]})})
    splits.save_to_disk(str(tmp_path / "d"))
    data = tasks.load_task_data(str(tmp_path / "d"), test_size=10)
    assert data.test["text"] == ["Seen in test", "only test"] and "seen in test" not in data.train["text"]


def test_the_validation_split_comes_from_the_pool_and_is_the_same_for_every_run(task):
    with_val = tasks.load_task_data("", val_size=500)
    assert with_val.test["text"] == task.test["text"]  # the test set does not move
    assert len(with_val.val) == 500 and len(with_val.train) == len(task.train) - 500
    assert set(with_val.val["text"]) | set(with_val.train["text"]) == set(task.train["text"])
    labels = Counter(task.train["label"])
    expected = {c: 500 * n / len(task.train) for c, n in labels.items()}
    assert Counter(with_val.val["label"]) == pytest.approx(expected, abs=1)  # stratified
    with pytest.raises(D.DataError, match="test-size 1000 \\+ val-size 40000 must be smaller"):
        tasks.load_task_data("", val_size=40000)

    tasks._load_task_data.cache_clear()
    again = tasks.load_task_data("")
    assert again is not task
    assert again.test["text"] == task.test["text"]
    assert again.train["text"] == task.train["text"]
    other_seed = tasks.load_task_data("", split_seed=1)
    assert other_seed.test["text"] != task.test["text"]


def test_same_test_set_for_every_run_seed(task, pool):
    # The run seed only drives partitioning: for every seed the clients share exactly the
    # pool, never a test row, and the test set is untouched.
    test_before = task.test["text"]
    for seed in (1, 2):
        parts = [D.partition_dataset(pool, partitioner="iid", num_partitions=3, partition_id=i, seed=seed)
                 for i in range(3)]
        assert sorted(i for p in parts for i in _col(p, "idx")) == list(range(len(pool)))
    assert task.test["text"] == test_before


# ---------------------------------------------------------------- partitions

@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_partitions_disjoint_cover_deterministic(pool, partitioner):
    def parts(seed):
        return [D.partition_dataset(pool, partitioner=partitioner, num_partitions=4, partition_id=i,
                                    alpha=0.5, seed=seed) for i in range(4)]

    first = parts(42)
    ids = [_col(p, "idx") for p in first]
    flat = [i for p in ids for i in p]
    assert len(flat) == len(set(flat)) == len(pool)
    assert [_col(p, "idx") for p in parts(42)] == ids
    if partitioner == "dirichlet":
        assert [len(p) for p in parts(7)] != [len(p) for p in first]
        # Label skew: the share of positive tweets differs a lot between clients.
        shares = [Counter(_col(p, "label"))[2] / len(p) for p in first]
        assert max(shares) - min(shares) > 0.1
    else:
        assert _col(D.partition_dataset(pool, partitioner="iid", num_partitions=4, partition_id=0, seed=7),
                    "idx") != ids[0]


@pytest.mark.filterwarnings("ignore:The specified min_partition_size")
def test_inner_dirichlet_gives_a_thousand_nodes_a_few_dozen_rows_each_with_their_own_label_mix(pool):
    with pytest.raises(D.DataError, match="inner-dirichlet"):  # sizes vary: many of 1,000 get < 10 rows
        D.partition_dataset(pool, partitioner="dirichlet", num_partitions=1000, partition_id=0)
    parts = [D.partition_dataset(pool, partitioner="inner-dirichlet", num_partitions=1000, partition_id=i, alpha=0.5,
                                 seed=42) for i in range(0, 1000, 50)]
    assert {len(p) for p in parts} <= {len(pool) // 1000, len(pool) // 1000 + 1}
    ids = [i for p in parts for i in _col(p, "idx")]
    assert len(ids) == len(set(ids))
    shares = [Counter(_col(p, "label"))[2] / len(p) for p in parts]
    assert max(shares) - min(shares) > 0.3  # label skew, as with dirichlet
    again = D.partition_dataset(pool, partitioner="inner-dirichlet", num_partitions=1000, partition_id=50, seed=42)
    assert _col(again, "idx") == _col(parts[1], "idx")


def test_natural_partitions_one_topic_each(task):
    topics = []
    for i in range(7):
        part = D.partition_dataset(task.train, partitioner="natural", num_partitions=7, partition_id=i)
        (topic,) = set(_col(part, "topic"))
        topics.append(topic)
    assert topics == sorted(D.TOPICS)  # partition i is the i-th topic in sorted order


# ---------------------------------------------------------------- errors

def test_missing_column_names_key_and_columns(tmp_path):
    with pytest.raises(D.DataError, match="text-column") as err:
        tasks.load_task_data("", text_column="tweet")
    assert "'tweet'" in str(err.value) and "['text', 'label', 'topic']" in str(err.value)
    csv_path = _write_csv(tmp_path / "d.csv")
    with pytest.raises(D.DataError, match="label-column") as err:
        tasks.load_task_data(str(csv_path), text_column="sentence")
    assert "sentiment" in str(err.value)
    with pytest.raises(D.DataError, match="image-column"):
        tasks.load_task_data(str(csv_path), task="image-classification", label_column="sentiment")


def test_partition_errors(task):
    with pytest.raises(D.DataError, match="'random'.*iid"):
        D.partition_dataset(task.train, partitioner="random", num_partitions=2, partition_id=0)
    with pytest.raises(D.DataError, match=r"num-partitions is 3 .*7 distinct.*num-supernodes=7"):
        D.partition_dataset(task.train, partitioner="natural", num_partitions=3, partition_id=0)
    with pytest.raises(D.DataError, match="'nope'"):
        D.partition_dataset(task.train, partitioner="natural", num_partitions=7, partition_id=0,
                            natural_column="nope")
    with pytest.raises(D.DataError, match="partition-id 2"):
        D.partition_dataset(task.train, partitioner="iid", num_partitions=2, partition_id=2)
    with pytest.raises(D.DataError, match="dirichlet-alpha"):
        D.partition_dataset(task.train, partitioner="dirichlet", num_partitions=2, partition_id=0, alpha=0)


@pytest.mark.filterwarnings("ignore:The specified min_partition_size")
def test_dirichlet_impossible_gives_data_error(tmp_path):
    td = tasks.load_task_data(str(_write_csv(tmp_path / "d.csv")), text_column="sentence",
                          label_column="sentiment", test_size=6)
    with pytest.raises(D.DataError, match="dirichlet-alpha"):  # 5 clients x 10 rows > 24 rows
        D.partition_dataset(td.train, partitioner="dirichlet", num_partitions=5, partition_id=0)


def test_test_size_errors(tmp_path):
    csv_path = str(_write_csv(tmp_path / "d.csv", n=20))
    kwargs = dict(text_column="sentence", label_column="sentiment")
    with pytest.raises(D.DataError, match="test-size 20 .*20 rows"):
        tasks.load_task_data(csv_path, test_size=20, **kwargs)
    with pytest.raises(D.DataError, match="test-size"):
        tasks.load_task_data(csv_path, test_size=-1, **kwargs)


def test_source_errors(tmp_path):
    (tmp_path / "data.txt").write_text("a,b\n")
    with pytest.raises(D.DataError, match=r"data\.txt.*\.csv"):
        tasks.load_task_data(str(tmp_path / "data.txt"))
    missing = str(tmp_path / "missing.csv")
    with pytest.raises(D.DataError, match="missing.csv"):
        tasks.load_task_data(missing)
    with pytest.raises(D.DataError, match="does not exist"):
        tasks.load_task_data("./no/such/dir")
    with pytest.raises(D.DataError, match="text-only"):
        tasks.load_task_data("", task="image-classification")
    with pytest.raises(D.DataError, match="task"):
        tasks.load_task_data("", task="regression")
    one_class = tmp_path / "one.csv"
    one_class.write_text("text,label\n" + "".join(f"t{i},same\n" for i in range(10)))
    with pytest.raises(D.DataError, match="at least 2"):
        tasks.load_task_data(str(one_class), test_size=2)


def test_hub_id_offline_fails_fast():
    start = time.monotonic()
    with pytest.raises(D.DataError, match="Hub.*local") as err:
        tasks.load_task_data("someone/no-such-dataset")
    assert time.monotonic() - start < 10
    assert err.value.__cause__ is not None


# ---------------------------------------------------------------- user files

def test_user_csv_string_labels(tmp_path):
    csv_path = _write_csv(tmp_path / "d.csv")
    td = tasks.load_task_data(str(csv_path), text_column="sentence", label_column="sentiment",
                          natural_column="city", test_size=6)
    assert td.label_names == ("meh", "neg", "pos")
    assert td.train.column_names == ["text", "label", "city"]
    assert (len(td.train), len(td.test)) == (24, 6)
    assert Counter(td.test["label"]) == {0: 2, 1: 2, 2: 2}  # stratified
    original = {f"tweet number {i}, ok": ["pos", "neg", "meh"][i % 3] for i in range(30)}
    for row in list(td.train) + list(td.test):
        assert td.label_names[row["label"]] == original[row["text"]]
    part = D.partition_dataset(td.train, partitioner="natural", num_partitions=2, partition_id=1,
                               natural_column="city")
    assert set(part["city"]) == {"c1"}


def test_user_jsonl_integer_labels(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"body": f"review {i}", "stars": [5, 7, 9][i % 3]} for i in range(15)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    td = tasks.load_task_data(str(path), text_column="body", label_column="stars", test_size=3)
    assert td.label_names == ("5", "7", "9")
    stars = {r["body"]: r["stars"] for r in rows}
    for row in list(td.train) + list(td.test):
        assert int(td.label_names[row["label"]]) == stars[row["text"]]
    assert isinstance(td.train.features["label"], datasets.ClassLabel)


def test_user_parquet_and_empty_test(tmp_path):
    path = tmp_path / "d.parquet"
    datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(12)],
                                "label": ["b", "a"] * 6}).to_parquet(str(path))
    td = tasks.load_task_data(str(path), test_size=0)
    assert td.label_names == ("a", "b")
    assert len(td.train) == 12 and len(td.test) == 0
    assert td.test.column_names == ["text", "label"]


def test_saved_dataset_dict_uses_its_test_split(tmp_path):
    make = lambda n, tag: datasets.Dataset.from_dict(  # noqa: E731
        {"text": [f"{tag}{i}" for i in range(n)], "label": [i % 2 for i in range(n)]})
    saved = datasets.DatasetDict({"train": make(20, "tr"), "test": make(10, "te")})
    saved.save_to_disk(str(tmp_path / "saved"))
    td = tasks.load_task_data(str(tmp_path / "saved"), test_size=4)
    assert len(td.train) == 20 and len(td.test) == 4
    assert all(t.startswith("te") for t in td.test["text"])
    assert td.label_names == ("0", "1")


# ---------------------------------------------------------------- images

def test_imagefolder_real_digits(tmp_path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    truth = {}
    for digit, name in enumerate(names):
        (tmp_path / "digits" / name).mkdir(parents=True)
        for k, idx in enumerate(np.flatnonzero(digits.target == digit)[:6]):
            pixels = (digits.images[idx] * 15).astype(np.uint8).repeat(4, 0).repeat(4, 1)  # 32x32
            PILImage.fromarray(pixels, mode="L").save(tmp_path / "digits" / name / f"{k}.png")
            truth[pixels.tobytes()] = name

    td = tasks.load_task_data(str(tmp_path / "digits"), task="image-classification", test_size=10)
    assert td.input_column == "image"
    assert td.label_names == tuple(sorted(names))
    assert td.train.column_names == ["image", "label"]
    assert (len(td.train), len(td.test)) == (50, 10)
    assert len(set(td.test["label"])) == 10  # stratified: one image per digit
    for row in list(td.train) + list(td.test):
        assert isinstance(row["image"], PILImage.Image) and row["image"].size == (32, 32)
        assert isinstance(row["label"], int)
        assert td.label_names[row["label"]] == truth[np.asarray(row["image"].convert("L")).tobytes()]


def test_loading_prints_no_progress_bar_and_leaves_the_setting_alone(tmp_path, capfd):
    # The held-out split copies rows; its "Flattening the indices" bar repeated in every node's log, every round.
    datasets.enable_progress_bars()
    tasks.load_task_data(str(_write_csv(tmp_path / "fresh.csv")), text_column="sentence", label_column="sentiment",
                     test_size=4)
    assert "Flattening" not in capfd.readouterr().err
    assert datasets.is_progress_bar_enabled()  # a user's own datasets calls keep their bars
