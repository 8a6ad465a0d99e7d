"""Shared test settings and fixtures."""

import random
from pathlib import Path

import pytest
import torch

# One intra-op thread: the suite is small per step, and on a shared 2-core machine several
# torch processes with two spinning OpenMP threads each slow one another down many times over.
torch.set_num_threads(1)


FIXTURES = Path(__file__).parent / "fixtures"


def pytest_sessionstart(session: pytest.Session) -> None:
    """Write the synthetic shop (tests/fixtures/shop) once if it is not there: it is generated
    by a seeded script, not committed as data."""
    if not (FIXTURES / "shop" / "shop.inter").exists():
        import importlib.util

        loader = importlib.util.spec_from_file_location("make_shop", FIXTURES / "make_shop.py")
        assert loader is not None and loader.loader is not None
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
        module.main(FIXTURES / "shop")


FIXTURE_DOMAINS = {"Alpha": 40, "Beta": 30, "Gamma": 50}


def _write_domain(folder: Path, items: int, seed: int) -> None:
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    (folder / "num_items.txt").write_text(f"{items}\n")
    for split, count in (("train", 60), ("valid", 12), ("test", 12)):
        lines = []
        for user in range(count):
            start = rng.randrange(items)
            length = rng.randint(4, 8)
            lines.append("\t".join([str(user)] + [str((start + 3 * j) % items) for j in range(length)]))
        (folder / f"{split}_data.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture()
def fkcb_like(tmp_path: Path) -> Path:
    """A tiny FedDCSR-format data set: three domains of 30 to 50 items."""
    for seed, (name, items) in enumerate(FIXTURE_DOMAINS.items()):
        _write_domain(tmp_path / "data" / name, items, seed)
    return tmp_path / "data"
