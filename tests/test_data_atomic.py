import numpy as np
import pytest

from p2pmoe.data import DataFormatError, read_atomic


def _write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return path


def test_reads_every_field_type(tmp_path):
    path = _write(
        tmp_path / "x.item",
        "id:token\ttags:token_seq\tscore:float\tvec:float_seq\na\tx y\t1.5\t1 2 3\nb\t\t\t\nc\tz\t-2\t4\n",
    )
    table = read_atomic(path)
    assert len(table) == 3
    assert table.types == {"id": "token", "tags": "token_seq", "score": "float", "vec": "float_seq"}
    assert table.columns["id"] == ["a", "b", "c"]
    assert table.columns["tags"] == [["x", "y"], [], ["z"]]
    np.testing.assert_array_equal(table.columns["score"], [1.5, np.nan, -2.0])
    assert table.columns["score"].dtype == np.float64
    assert [v.tolist() for v in table.columns["vec"]] == [[1.0, 2.0, 3.0], [], [4.0]]


def test_crlf_bom_and_blank_lines_keep_true_line_numbers(tmp_path):
    path = _write(tmp_path / "x.inter", "\ufeffu:token\tr:float\r\na\t1\r\n\r\nb\t2\r\n")
    table = read_atomic(path)
    assert table.columns["u"] == ["a", "b"]
    np.testing.assert_array_equal(table.columns["r"], [1.0, 2.0])
    assert [table.line_of(0), table.line_of(1)] == [2, 4]


def test_header_only_file_gives_empty_columns(tmp_path):
    table = read_atomic(_write(tmp_path / "x.inter", "u:token\tr:float\n"))
    assert len(table) == 0
    assert table.columns["u"] == [] and table.columns["r"].shape == (0,)


@pytest.mark.parametrize(
    "text, line, expected",
    [
        ("u:token\tr:float\na\t1\nb\t2\t3\n", 3, "2 tab-separated fields"),
        ("u:token\tr:float\na\t1\nb\n", 3, "2 tab-separated fields"),
        ("u:token\tr:number\na\t1\n", 1, "name:type"),
        ("u\tr:float\na\t1\n", 1, "name:type"),
        ("u:token\tu:float\na\t1\n", 1, "distinct column names"),
        ("u:token\tr:float\na\t1\nb\tfive\n", 3, "a number in column 'r'"),
        ("u:token\tv:float_seq\na\t1 x\n", 2, "a number in column 'v'"),
        ("", 1, "a header line"),
    ],
)
def test_malformed_input_names_file_line_and_format(tmp_path, text, line, expected):
    path = _write(tmp_path / "bad.inter", text)
    with pytest.raises(DataFormatError) as err:
        read_atomic(path)
    assert err.value.path == str(path) and err.value.line == line
    assert expected in err.value.expected
    assert f"bad.inter:{line}" in str(err.value)


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "x.item"
    path.write_bytes(b"id:token\na\n" + b"caf\xe9\n")
    with pytest.raises(DataFormatError) as err:
        read_atomic(path)
    assert err.value.line == 3 and "UTF-8" in err.value.expected


def test_column_checks_presence_and_type(tmp_path):
    table = read_atomic(_write(tmp_path / "x.inter", "u:token\tr:float\na\t1\n"))
    assert table.column("u", "token") == ["a"]
    with pytest.raises(DataFormatError, match="a column named 'rating'") as err:
        table.column("rating")
    assert err.value.line == 1
    with pytest.raises(DataFormatError, match="column u:float"):
        table.column("u", "float")
