import gzip

import numpy as np
import pytest

from p2pmoe.data import DataFormatError, ScenarioData, random_split, read_aliexpress_csv

HEADER = "search_id,categorical_1,categorical_2,numerical_1,numerical_2,numerical_3,click,conversion"


def _rows(n, seed=0):
    rng = np.random.default_rng(seed)
    cat = rng.integers(0, 7, size=(n, 2))
    num = rng.normal(size=(n, 3)).round(3)
    click = rng.integers(0, 2, size=n)
    conversion = click * rng.integers(0, 2, size=n)
    lines = [f"{i},{c[0]},{c[1]},{x[0]},{x[1]},{x[2]},{k},{v}" for i, (c, x, k, v) in enumerate(zip(cat, num, click, conversion, strict=True))]
    return lines, cat, num, np.column_stack([click, conversion])


def _write(path, header, lines):
    text = "\n".join([header, *lines]) + "\n"
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["train.csv", "train.csv.gz"])
def test_reads_features_and_labels_by_header_name(tmp_path, name):
    lines, cat, num, labels = _rows(50)
    data = read_aliexpress_csv(_write(tmp_path / name, HEADER, lines), "NL", test_fraction=0.2, seed=1)
    assert data.name == "NL" and len(data) == 50
    assert data.categorical_names == ("categorical_1", "categorical_2")
    assert data.numerical_names == ("numerical_1", "numerical_2", "numerical_3")
    assert data.tasks == ("click", "conversion")
    np.testing.assert_array_equal(data.categorical, cat)
    assert data.categorical.dtype == np.int64 and data.numerical.dtype == np.float32
    np.testing.assert_allclose(data.numerical, num, rtol=1e-6)
    np.testing.assert_array_equal(data.labels, labels)
    assert data.cardinalities == tuple(int(v) + 1 for v in cat.max(axis=0))
    assert len(data.test_idx) == 10 and sorted([*data.train_idx, *data.test_idx]) == list(range(50))


def test_separate_test_file_keeps_the_published_split(tmp_path):
    train_lines, *_ = _rows(30, seed=0)
    test_lines, test_cat, _, _ = _rows(12, seed=1)
    data = read_aliexpress_csv(_write(tmp_path / "train.csv", HEADER, train_lines), "ES", _write(tmp_path / "test.csv", HEADER, test_lines))
    assert data.train_idx.tolist() == list(range(30)) and data.test_idx.tolist() == list(range(30, 42))
    np.testing.assert_array_equal(data.categorical[data.test_idx], test_cat)


def test_column_order_and_purchase_label_follow_the_header(tmp_path):
    path = _write(tmp_path / "x.csv", "purchase,numerical_a,click,categorical_z,id", ["1,0.5,1,3,7", "", "0,1.5,0,2,8"])
    data = read_aliexpress_csv(path, "FR")
    assert data.tasks == ("click", "purchase")
    assert data.labels.tolist() == [[1, 1], [0, 0]]
    assert data.categorical.tolist() == [[3], [2]] and data.numerical.tolist() == [[0.5], [1.5]]


def test_header_only_file_gives_an_empty_scenario(tmp_path):
    data = read_aliexpress_csv(_write(tmp_path / "x.csv", HEADER, []), "US")
    assert len(data) == 0 and data.categorical.shape == (0, 2) and data.cardinalities == (0, 0)


@pytest.mark.parametrize(
    "bad, line, expected",
    [
        ("9,1,2,0.1,0.2,0.3,1", 4, "8 comma-separated fields"),
        ("9,1,2,0.1,oops,0.3,1,0", 4, "a number in column 5"),
        ("9,1,2,0.1,,0.3,1,0", 4, "a number in column 5"),
        ("9,1.5,2,0.1,0.2,0.3,1,0", 4, "non-negative integer categorical codes"),
        ("9,-1,2,0.1,0.2,0.3,1,0", 4, "non-negative integer categorical codes"),
        ("9,1,2,0.1,0.2,0.3,2,0", 4, "labels 0 or 1"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, bad, line, expected):
    lines, *_ = _rows(2)
    path = _write(tmp_path / "x.csv", HEADER, [lines[0], "", bad, lines[1]])
    with pytest.raises(DataFormatError) as err:
        read_aliexpress_csv(path, "NL")
    assert err.value.path == str(path) and err.value.line == line
    assert expected in err.value.expected


def test_bad_headers_are_rejected(tmp_path):
    with pytest.raises(DataFormatError, match="click column") as err:
        read_aliexpress_csv(_write(tmp_path / "a.csv", "categorical_1,click", ["1,0"]), "NL")
    assert err.value.line == 1
    with pytest.raises(DataFormatError, match="categorical\\* or numerical\\*"):
        read_aliexpress_csv(_write(tmp_path / "b.csv", "id,click,conversion", ["1,0,0"]), "NL")
    train = _write(tmp_path / "train.csv", HEADER, _rows(3)[0])
    test = _write(tmp_path / "test.csv", "categorical_1,click,conversion", ["1,0,0"])
    with pytest.raises(DataFormatError, match="same columns as train.csv"):
        read_aliexpress_csv(train, "NL", test)


def test_random_split_is_seeded_disjoint_and_sized():
    train, test = random_split(10, 0.3, np.random.default_rng(5))
    again = random_split(10, 0.3, np.random.default_rng(5))
    assert len(test) == 3 and sorted([*train, *test]) == list(range(10))
    assert train.tolist() == sorted(train.tolist()) and test.tolist() == again[1].tolist()
    with pytest.raises(ValueError):
        random_split(10, 1.0, np.random.default_rng(0))


def test_scenario_data_checks_shapes():
    with pytest.raises(ValueError, match="shapes disagree"):
        ScenarioData(
            name="x",
            categorical=np.zeros((3, 2), np.int64),
            categorical_names=("a",),
            cardinalities=(1,),
            numerical=np.zeros((3, 0), np.float32),
            numerical_names=(),
            labels=np.zeros((3, 2), np.float32),
            tasks=("click", "like"),
            train_idx=np.arange(3),
            test_idx=np.arange(0),
        )
