"""What a node caches: its own data file mapped to the server's labels, tokenized rows on disk."""

import pytest

from safedlora_app import node_resources as nr
from safedlora_app.config import RunConfig
from safedlora_app.data import DataError

LABELS = ("negative", "neutral", "positive")


@pytest.fixture
def node_csv(tmp_path):
    path = tmp_path / "local.csv"
    rows = ["text,label"] + [
        f"tweet number {i} is {'great' if i % 2 else 'awful'},{'positive' if i % 2 else 'negative'}" for i in range(12)
    ]
    path.write_text("\n".join(rows) + "\n")
    return path


def config(tmp_path, **overrides):
    return RunConfig(cache_dir=str(tmp_path / "cache"), **overrides)


def test_node_local_file_uses_the_server_label_order_and_caches_tokens(tmp_path, node_csv):
    nr.clear_caches()
    first = nr.node_resources(config(tmp_path), {"data-path": str(node_csv)}, LABELS)
    # The file knows only 'negative' and 'positive' (local ids 0, 1); the server's ids are 0 and 2.
    assert sorted(set(first.data.labels.tolist())) == [0, 2]
    assert first.partition_label == f"data-path {node_csv}"
    cached = list((tmp_path / "cache" / "encoded").glob("*.safetensors"))
    assert len(cached) == 1
    nr.clear_caches()  # a fresh process: everything comes from the disk cache
    second = nr.node_resources(config(tmp_path), {"data-path": str(node_csv)}, LABELS)
    assert second.data.tokens == first.data.tokens and second.data.labels.tolist() == first.data.labels.tolist()
    node_csv.write_text(node_csv.read_text() + "one more tweet,neutral\n")  # a changed file is re-read
    nr.clear_caches()
    assert len(nr.node_resources(config(tmp_path), {"data-path": str(node_csv)}, LABELS).data) == 13


def test_missing_data_path_and_unknown_labels_are_clear_errors(tmp_path, node_csv):
    nr.clear_caches()
    with pytest.raises(DataError, match="data-path = '/nope/local.csv' does not exist on this node"):
        nr.node_resources(config(tmp_path), {"data-path": "/nope/local.csv"}, LABELS)
    with pytest.raises(DataError, match=r"labels \['positive'\] that the server does not know"):
        nr.node_resources(config(tmp_path), {"data-path": str(node_csv)}, ("negative", "neutral"))


def test_one_process_serving_many_nodes_keeps_one_model_and_a_few_partitions(tmp_path):
    """A Ray actor serves many virtual nodes: its memory must not grow with their number."""
    nr.clear_caches()
    run = config(tmp_path, partitioner="iid", test_size=100)
    served = [nr.node_resources(run, {"partition-id": k, "num-partitions": 400}, LABELS) for k in range(12)]
    assert len({id(r.base_model) for r in served}) == 1
    assert len(nr._DATA) == nr._DATA_PARTITIONS and len(nr._MODELS) == 1
    # The most recent partitions stay cached (same object); an evicted one is reloaded from disk.
    assert nr.node_resources(run, {"partition-id": 11, "num-partitions": 400}, LABELS).data is served[11].data
    again = nr.node_resources(run, {"partition-id": 0, "num-partitions": 400}, LABELS)
    assert again.data is not served[0].data and again.data.tokens == served[0].data.tokens


@pytest.mark.parametrize("name, content, problem", [
    ("no-label.csv", "text,sentiment\nhello,positive\nbye,negative\n", r"Column 'label' not found"),
    ("empty.csv", "", r"is empty"),
    ("latin1.csv", "text,label\ncaf\xe9 ol\xe9,positive\nbye,negative\n".encode("latin-1"),
     r"is not utf-8 text \(byte b'\\xe9' at offset \d+\); save it as UTF-8"),
    ("notes.txt", "text,label\nhi,positive\n", r"extension must be one of"),
])
def test_broken_node_local_files_name_the_file_and_the_problem(tmp_path, name, content, problem):
    nr.clear_caches()
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=rf"data-path = '{path}'.*{problem}"):
        nr.node_resources(config(tmp_path), {"data-path": str(path)}, LABELS)


def test_a_tab_separated_file_is_read(tmp_path):
    nr.clear_caches()
    path = tmp_path / "local.tsv"
    path.write_text("text\tlabel\n" + "".join(f"tweet, with a comma {i}\t{LABELS[i % 3]}\n" for i in range(9)))
    resources = nr.node_resources(config(tmp_path), {"data-path": str(path)}, LABELS)
    assert len(resources.data) == 9 and sorted(set(resources.data.labels.tolist())) == [0, 1, 2]
