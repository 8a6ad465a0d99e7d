import os
from pathlib import Path

import pytest

from p2pmoe.data import FKCB_DOMAINS, DataFormatError, DataNotFoundError, load_feddcsr, load_feddcsr_domain

SPLITS = {
    "train": "0\t0\t1\t2\n0\t3\t4\n2\t5\t6\t7\t8\n",
    "valid": "4\t1\t2\t3\n",
    "test": "4\t1\t2\t3\t9\n\n7\t8\t0\n",
}


def _write_domain(root, name, num_items="10\n", **overrides):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "num_items.txt").write_text(num_items)
    for split, text in {**SPLITS, **overrides}.items():
        (folder / f"{split}_data.txt").write_text(text)
    return folder


def test_reads_sequences_users_and_item_count(tmp_path):
    domain = load_feddcsr_domain(_write_domain(tmp_path, "Food"))
    assert domain.name == "Food" and domain.num_items == 10
    assert domain.train == [[0, 1, 2], [3, 4], [5, 6, 7, 8]] and domain.train_users == [0, 0, 2]
    assert domain.valid == [[1, 2, 3]] and domain.valid_users == [4]
    assert domain.test == [[1, 2, 3, 9], [8, 0]] and domain.test_users == [4, 7]
    assert domain.global_items is None


def test_domain_order_default_sorted_or_as_given(tmp_path):
    for name in ("Kitchen", "Beauty", "Food"):
        _write_domain(tmp_path, name)
    (tmp_path / "notes").mkdir()
    assert [d.name for d in load_feddcsr(tmp_path)] == ["Beauty", "Food", "Kitchen"]
    assert [d.name for d in load_feddcsr(tmp_path, ["Food", "Kitchen", "Beauty"])] == ["Food", "Kitchen", "Beauty"]


@pytest.mark.parametrize(
    "split, text, line, expected",
    [
        ("train", "0\t1\n0\tx\t2\n", 2, "integers"),
        ("train", "0\t1\n1\n", 2, "at least 1 item"),
        ("valid", "0\t1\t2\n\n3\t4\n", 3, "at least 2 item"),
        ("test", "0\t1\t10\n", 1, "item ids in 0..9"),
        ("test", "0\t-1\t2\n", 1, "item ids in 0..9"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, split, text, line, expected):
    folder = _write_domain(tmp_path, "Food", **{split: text})
    with pytest.raises(DataFormatError) as err:
        load_feddcsr_domain(folder)
    assert err.value.path == str(folder / f"{split}_data.txt") and err.value.line == line
    assert expected in err.value.expected


@pytest.mark.parametrize("num_items", ["", "ten\n", "0\n"])
def test_bad_item_count_is_rejected(tmp_path, num_items):
    folder = _write_domain(tmp_path, "Food", num_items=num_items)
    with pytest.raises(DataFormatError, match="num_items.txt:1"):
        load_feddcsr_domain(folder)


def test_missing_data_says_what_to_provide(tmp_path):
    with pytest.raises(DataNotFoundError, match="train,valid,test"):
        load_feddcsr(tmp_path / "absent")
    with pytest.raises(DataNotFoundError):
        load_feddcsr(tmp_path)  # no domain folders
    folder = _write_domain(tmp_path, "Food")
    (folder / "test_data.txt").unlink()
    with pytest.raises(DataNotFoundError, match="test_data.txt"):
        load_feddcsr(tmp_path)


FKCB = os.environ.get("P2PMOE_FKCB")


@pytest.mark.skipif(not FKCB or not Path(FKCB).is_dir(), reason="set P2PMOE_FKCB to the FKCB folder to run")
def test_real_fkcb_matches_its_readme():
    counts = {d.name: (d.num_items, len(d.train), len(d.valid), len(d.test)) for d in load_feddcsr(FKCB, FKCB_DOMAINS)}
    assert counts == {
        "Food": (13_564, 4_977, 1_307, 1_332),
        "Kitchen": (32_918, 11_100, 2_172, 2_254),
        "Clothing": (34_909, 5_720, 818, 866),
        "Beauty": (17_780, 4_668, 836, 855),
    }
