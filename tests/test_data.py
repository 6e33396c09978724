"""Data loading: both AG News CSV formats, generic columns, and one clear error per malformed input."""

from __future__ import annotations

import gzip

import pytest

from fedslip.config import make_config
from fedslip.data import DataError, load_splits, read_csv_split

AG = ["title", "description"]


def write(path, text):
    path.write_text(text)
    return path


def test_header_format(tmp_path):
    split = read_csv_split(write(tmp_path / "t.csv", 'label,title,description\n3,Chip,"Fast, new"\n0,War,\n'),
                           AG, "label", 4)
    assert list(split.labels) == [3, 0]
    assert split.texts == ["Chip Fast, new", "War"]


def test_original_headerless_format_is_one_based(tmp_path):
    split = read_csv_split(write(tmp_path / "t.csv", '1,War,Peace talks\n4,Chip,Faster\n'), AG, "label", 4)
    assert list(split.labels) == [0, 3]


def test_gzip_and_directory_lookup(tmp_path):
    with gzip.open(tmp_path / "train.csv.gz", "wt") as f:
        f.write("label,title,description\n1,a,b\n")
    write(tmp_path / "test.csv", "label,title,description\n2,c,d\n")
    train, test = load_splits(make_config({"data_dir": str(tmp_path)}))
    assert list(train.labels) == [1] and list(test.labels) == [2]


def test_generic_text_label_columns(tmp_path):
    split = read_csv_split(write(tmp_path / "t.csv", "sentence,y\nhello,1\nbye,0\n"), ["sentence"], "y", 2)
    assert split.texts == ["hello", "bye"] and list(split.labels) == [1, 0]


@pytest.mark.parametrize("content, needle", [
    ("", "empty"),
    ("label,title,description\n", "no rows"),
    ("label,headline\n1,a\n", "missing"),
    ("label,title,description\nx,a,b\n", "not an integer"),
    ("label,title,description\n1.5,a,b\n", "not an integer"),
    ("label,title,description\n4,a,b\n", "outside 0..3"),
    ("label,title,description\n-1,a,b\n", "outside 0..3"),
    ("0,a,b\n", "outside 1..4"),
    ("1,a\n", "headerless"),
])
def test_malformed_csv_is_one_clear_error(tmp_path, content, needle):
    path = write(tmp_path / "train.csv", content)
    with pytest.raises(DataError, match=needle) as err:
        read_csv_split(path, AG, "label", 4)
    assert str(path) in str(err.value)


def test_missing_directory_and_split(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_splits(make_config({"data_dir": str(tmp_path / "nowhere")}))
    write(tmp_path / "train.csv", "label,title,description\n1,a,b\n")
    with pytest.raises(DataError, match="no test.csv"):
        load_splits(make_config({"data_dir": str(tmp_path)}))


def test_read_csv_split_is_the_only_reader_of_data_files():
    """Every data file (a data directory's splits, a client's own file, the audit's public rows) goes through
    ``read_csv_split``, so each damaged file gets its one-line error (tests/test_bad_inputs.py)."""
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "fedslip"
    readers = {str(p.relative_to(package)) for p in package.rglob("*.py")
               if "read_csv(" in p.read_text() or "gzip.open(" in p.read_text()}
    assert readers == {"data.py"} and Path(package / "data.py").read_text().count("read_csv(") == 1
