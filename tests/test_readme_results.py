"""Issue 31: every number with a decimal point in the README's Results section comes from a
committed results file that its paragraph cites (bench/results/<name>.md or .json, or a
folder of them), so a rerun that changes a result cannot leave a stale number behind.

A number counts as found when a number in a cited file equals it to the README's precision,
as it is or in the README's usual units: points of a fraction (x100) and GB of MB or MiB; or
when it is the difference of two numbers of the same paragraph ("2.70 below FedDCSR's 15.24").
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DECIMAL = re.compile(r"(?<![\w.])\d+\.\d+(?![\w.])")
UNITS = (1.0, 100.0, 1e-3, 1 / 1024)


def results_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("\n## Results")
    return text[start : text.index("\n## ", start + 1)]


def paragraphs(section: str) -> list[str]:
    """Blocks that start with a bold title: one result and what it cites."""
    return [b for b in re.split(r"\n(?=\*\*)", section) if b.startswith("**")]


def cited_numbers(block: str) -> set[float]:
    """Every number in the results files and folders the block names in backticks."""
    names = set(re.findall(r"(?:bench/results/)?([\w.\-{},]+?)\.(?:md|json|png)`?", block))
    stems = {n.split(".")[0] for name in names for n in re.sub(r"\{([^}]*)\}", lambda m: "|".join(m.group(1).split(",")), name).split("|")}
    stems |= {re.sub(r"\{.*", "", name) for name in names}
    files = [p for stem in stems if stem for p in RESULTS.glob(f"{stem}*") if p.is_file() and p.suffix in (".md", ".json")]
    files += [p for stem in stems if stem for d in RESULTS.glob(f"{stem}*") if d.is_dir() for p in d.rglob("*") if p.suffix in (".md", ".json")]
    return {abs(float(x)) for p in files for x in re.findall(r"-?\d+\.\d+(?:e-?\d+)?", p.read_text(errors="ignore"))}


def found(number: str, pool: set[float]) -> bool:
    value, tolerance = float(number), 0.5 * 10 ** -len(number.split(".")[1]) + 1e-9
    return any(abs(x * unit - value) <= tolerance for x in pool for unit in UNITS)


def test_every_number_in_the_results_section_is_in_a_cited_results_file():
    blocks = paragraphs(results_section())
    assert len(blocks) >= 5
    missing = []
    for block in blocks:
        shown = [float(n) for n in DECIMAL.findall(block)]
        pool = cited_numbers(block) | {abs(a - b) for a in shown for b in shown if a != b}
        missing += [(block.split("\n", 1)[0][:60], n) for n in DECIMAL.findall(block) if not found(n, pool)]
    assert not missing, f"numbers in README's Results that no cited results file holds: {missing}"


def test_the_check_finds_a_number_no_file_holds():
    block = "**X** (`bench/results/transport.md`): a ratio of 123.456 that no run made."
    assert not found("123.456", cited_numbers(block))
