import gzip
import json

import pytest

from fedtune.common.config import DataConfig
from fedtune.common.data import DataError, load_data
from tests.conftest import write_jsonl


def test_builtin_data_loads_offline():
    data = load_data(DataConfig(), seed=0)
    assert len(data.train) == 400 and len(data.test) == 200 and data.num_labels == 10


def test_directory_with_gzip_train_and_validation(tmp_path):
    with gzip.open(tmp_path / "train.jsonl.gz", "wt") as handle:
        handle.writelines(json.dumps({"text": f"t{i}", "label": i % 2}) + "\n" for i in range(10))
    write_jsonl(tmp_path / "validation.jsonl", [{"text": "v", "label": 1}])
    data = load_data(DataConfig(path=str(tmp_path)), seed=0)
    assert len(data.train) == 10 and len(data.test) == 1 and data.label_names == ["0", "1"]


def test_csv_with_named_columns_gets_a_seeded_test_split(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("sentence,y\n" + "".join(f"row {i},{i % 3}\n" for i in range(50)))
    config = DataConfig(path=str(path), text_field="sentence", label_field="y",
                        test_fraction=0.2)
    first, again = load_data(config, seed=1), load_data(config, seed=1)
    assert len(first.test) == 10 and len(first.train) == 40
    assert first.test.texts == again.test.texts


@pytest.mark.parametrize(("setup", "message"), [
    (lambda d: None, "has no train.jsonl"),
    (lambda d: (d / "train.jsonl").write_text("{not json\n"), "line 1 is not JSON"),
    (lambda d: write_jsonl(d / "train.jsonl", [{"text": "a"}]), "must be an integer"),
    (lambda d: write_jsonl(d / "train.jsonl", [{"label": 1}]), "'text' is missing"),
    (lambda d: write_jsonl(d / "train.jsonl", [{"text": "a", "label": -1}]), "out of range"),
])
def test_malformed_directories_are_named(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(DataError, match=None) as caught:
        load_data(DataConfig(path=str(tmp_path)), seed=0)
    assert message in str(caught.value)


def test_label_beyond_labels_json_is_refused(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 5}])
    (tmp_path / "labels.json").write_text(json.dumps({"0": "x", "1": "y"}))
    with pytest.raises(DataError, match="label 5 is out of range"):
        load_data(DataConfig(path=str(tmp_path)), seed=0)


@pytest.mark.parametrize("declared", [{}, {"0": "only"}])
def test_a_labels_json_that_declares_no_label_set_is_refused(tmp_path, declared):
    # an empty labels.json would let the head's width follow the rows' largest label again
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 5}])
    (tmp_path / "labels.json").write_text(json.dumps(declared))
    with pytest.raises(DataError, match="at least two labels"):
        load_data(DataConfig(path=str(tmp_path)), seed=0)


def test_missing_path_is_named(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_data(DataConfig(path=str(tmp_path / "nowhere")), seed=0)


def test_a_servers_held_out_split_may_stand_alone(tmp_path):
    write_jsonl(tmp_path / "test.jsonl", [{"text": f"t{i}", "label": i % 3} for i in range(6)])
    (tmp_path / "labels.json").write_text(json.dumps({"0": "a", "1": "b", "2": "c"}))
    config = DataConfig(path=str(tmp_path))

    data = load_data(config, seed=0, held_out_only=True)

    assert len(data.test) == 6 and len(data.train) == 0
    assert data.label_names == ["a", "b", "c"]
    with pytest.raises(DataError, match=r"has no train\.jsonl"):
        load_data(config, seed=0)  # simulation and the baseline still need training rows


def test_a_held_out_split_is_checked_like_any_other(tmp_path):
    write_jsonl(tmp_path / "test.jsonl", [{"text": "t", "label": 3}])
    (tmp_path / "labels.json").write_text(json.dumps({"0": "a", "1": "b"}))

    with pytest.raises(DataError, match="label 3 is out of range"):
        load_data(DataConfig(path=str(tmp_path)), seed=0, held_out_only=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"has no train\.jsonl or .*test\.jsonl"):
        load_data(DataConfig(path=str(tmp_path / "empty")), seed=0, held_out_only=True)
