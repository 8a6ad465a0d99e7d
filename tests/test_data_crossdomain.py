import pytest

from p2pmoe.config import default_config, resolve, with_options
from p2pmoe.data import DataFormatError, DataNotFoundError
from p2pmoe.data.crossdomain import load_atomic_domains, non_overlapped_domains, overlapped_timelines
from p2pmoe.tasks.sequential import sequence_domains
from p2pmoe.tasks.timelines import node_users

# (user, item, timestamp), out of time order on purpose; items: b1/b2/b3 books, m1/m2 movies.
INTER = [
    ("u9", "b1", 30),
    ("u9", "m1", 10),
    ("u9", "b2", 20),
    ("u9", "m2", 40),
    ("u9", "b3", 50),
    ("u2", "m1", 5),
    ("u2", "m2", 6),
    ("u2", "b1", 7),
    ("u2", "m1", 8),
    ("u2", "m2", 9),
    ("u2", "m1", 10),
    ("u5", "x0", 1),  # an item the .item file does not name: no domain
]
ITEMS = [("b1", "Books"), ("b2", "Books"), ("b3", "Books Extra"), ("m1", "Movies"), ("m2", "Movies")]


def write(root, name="shop", inter=INTER, items=ITEMS, item_header="item_id:token\tcategory:token_seq"):
    folder = root / name
    folder.mkdir(exist_ok=True)
    lines = ["user_id:token\titem_id:token\ttimestamp:float"] + [f"{u}\t{i}\t{t}" for u, i, t in inter]
    (folder / f"{name}.inter").write_text("\n".join(lines) + "\n")
    (folder / f"{name}.item").write_text("\n".join([item_header] + [f"{i}\t{c}" for i, c in items]) + "\n")
    return folder


def test_renumbering_and_domains(tmp_path):
    data = load_atomic_domains(write(tmp_path), "category")
    assert data.user_tokens == ["u9", "u2", "u5"] and data.item_tokens == ["b1", "m1", "b2", "m2", "b3", "x0"]
    assert data.domains == ("Books", "Movies")  # token_seq: the first token names the domain
    assert data.item_domain.tolist() == [0, 1, 0, 1, 0, -1]


def test_overlapped_view_merges_domains_in_time_order(tmp_path):
    timelines = overlapped_timelines(load_atomic_domains(write(tmp_path), "category"))
    assert [t.user for t in timelines] == [0, 1]  # u5 has no domain item left
    u9 = timelines[0]
    assert u9.items.tolist() == [1, 2, 0, 3, 4] and u9.domains.tolist() == [1, 0, 0, 1, 0]
    assert u9.timestamps.tolist() == [10, 20, 30, 40, 50]


def test_non_overlapped_view_puts_each_user_in_one_domain(tmp_path):
    books, movies = non_overlapped_domains(load_atomic_domains(write(tmp_path), "category"), min_len=3)
    assert books.train_users == [0] and movies.train_users == [1]  # u9: 3 books; u2: 5 movies
    assert books.global_items.tolist() == [0, 2, 4] and books.test == [[1, 0, 2]]  # b2, b1, b3 in time order
    assert movies.test == [[0, 1, 0, 1, 0]] and movies.valid == [[0, 1, 0, 1]] and movies.train == [[0, 1, 0]]


def test_missing_domain_field_and_malformed_files_name_the_problem(tmp_path):
    folder = write(tmp_path)
    with pytest.raises(DataFormatError, match="genre"):
        load_atomic_domains(folder, "genre")
    (folder / "shop.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\nu1\tb1\n")
    with pytest.raises(DataFormatError, match=r"shop\.inter:2: expected 3"):
        load_atomic_domains(folder, "category")
    (folder / "shop.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\nu1\tb1\tsoon\n")
    with pytest.raises(DataFormatError, match="timestamp"):
        load_atomic_domains(folder, "category")
    with pytest.raises(DataNotFoundError, match="other.inter"):
        load_atomic_domains(folder, "category", name="other")


def test_a_domain_with_too_few_users_is_named(tmp_path):
    folder = write(tmp_path, items=ITEMS + [("z1", "Toys")], inter=INTER + [("u2", "z1", 11)])
    with pytest.raises(ValueError, match=r"Toys \(1 users, 1 items\)") as err:
        load_atomic_domains(folder, "category", min_users=2)
    assert "Books" not in str(err.value)


def test_float_domain_field(tmp_path):
    items = [(i, "1" if i.startswith("b") else "2.5") for i, _ in ITEMS]
    data = load_atomic_domains(write(tmp_path, items=items, item_header="item_id:token\tcategory:float"), "category")
    assert data.domains == ("1", "2.5")


def test_both_task_families_read_atomic_folders(tmp_path):
    folder = str(write(tmp_path))
    books, movies = sequence_domains("atomic", folder, "category")
    assert books.name == "Books" and movies.name == "Movies"
    parts = node_users("atomic-timelines", folder, "category", 5, None, 2, 0)
    assert sorted(t.user for part in parts for t in part) == [0, 1] and all(len(p) == 1 for p in parts)
    cfg = resolve(with_options(default_config(data="atomic", data_root=folder, method="local"), task_options={"domain_field": "category"}))
    assert cfg.run.nodes == 2  # one client per domain of the files
