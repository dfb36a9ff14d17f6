"""What a node caches: its own data file mapped to the server's labels, tokenized rows on disk."""

import pytest

from safedlora_app import node_resources as nr
from safedlora_app.config import RunConfig

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
    nr._RESOURCES.clear()
    first = nr.node_resources(config(tmp_path), {"data-path": str(node_csv)}, LABELS)
    # The file knows only 'negative' and 'positive' (local ids 0, 1); the server's ids are 0 and 2.
    assert sorted(set(first.data.labels.tolist())) == [0, 2]
    assert first.partition_label == f"data-path {node_csv}"
    cached = list((tmp_path / "cache" / "encoded").glob("*.safetensors"))
    assert len(cached) == 1
    nr._RESOURCES.clear()  # a fresh process: everything comes from the disk cache
    second = nr.node_resources(config(tmp_path), {"data-path": str(node_csv)}, LABELS)
    assert second.data.tokens == first.data.tokens and second.data.labels.tolist() == first.data.labels.tolist()
    node_csv.write_text(node_csv.read_text() + "one more tweet,neutral\n")  # a changed file is re-read
    nr._RESOURCES.clear()
    assert len(nr.node_resources(config(tmp_path), {"data-path": str(node_csv)}, LABELS).data) == 13


def test_missing_data_path_and_unknown_labels_are_clear_errors(tmp_path, node_csv):
    nr._RESOURCES.clear()
    with pytest.raises(FileNotFoundError, match="data-path = '/nope/local.csv' does not exist on this node"):
        nr.node_resources(config(tmp_path), {"data-path": "/nope/local.csv"}, LABELS)
    with pytest.raises(ValueError, match=r"labels \['positive'\] that the server does not know"):
        nr.node_resources(config(tmp_path), {"data-path": str(node_csv)}, ("negative", "neutral"))
