"""Issue 31: every number with a decimal point in the README's Results section comes from a
committed results file that its paragraph cites (bench/results/<name>.md or .json, or a
folder of them), so a rerun that changes a result cannot leave a stale number behind.

A number counts as found when a number in a cited file (that exact name, .md or .json, or a
folder of that name) equals it to the README's precision, as it is or as points of a fraction
(x100); a number followed by "GB" may be MB or MiB in the file; a number written as a
difference ("+1.08 over", "2.70 below", "1.57 points") may be the difference of two numbers of
the same paragraph.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DECIMAL = re.compile(r"(?<![\w.])\d+\.\d+(?![\w.])")
UNITS, GB_UNITS = (1.0, 100.0), (1e-3, 1 / 1024)


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
    files = [RESULTS / f"{stem}{suffix}" for stem in stems if stem for suffix in (".md", ".json") if (RESULTS / f"{stem}{suffix}").is_file()]
    files += [p for stem in stems if stem and (RESULTS / stem).is_dir() for p in (RESULTS / stem).rglob("*") if p.suffix in (".md", ".json")]
    return {abs(float(x)) for p in files for x in re.findall(r"-?\d+\.\d+(?:e-?\d+)?", p.read_text(errors="ignore"))}


def found(number: str, pool: set[float], units: tuple[float, ...] = UNITS) -> bool:
    value, tolerance = float(number), 0.5 * 10 ** -len(number.split(".")[1]) + 1e-9
    return any(abs(x * unit - value) <= tolerance for x in pool for unit in units)


def checked(block: str) -> list[str]:
    """The block's numbers that no cited file holds (in the units the text allows)."""
    pool = cited_numbers(block)
    shown = [float(n) for n in DECIMAL.findall(block)]
    differences = {abs(a - b) for a in shown for b in shown if a != b}
    missing = []
    for match in DECIMAL.finditer(block):
        number, before, after = match.group(), block[max(0, match.start() - 1) : match.start()], block[match.end() : match.end() + 8]
        units = UNITS + GB_UNITS if after.startswith(" GB") else UNITS
        as_difference = before in "+−" and before != "" or re.match(r"\s(points|below|above|over)", after) is not None
        if not found(number, pool, units) and not (as_difference and found(number, differences)):
            missing.append(number)
    return missing


def test_every_number_in_the_results_section_is_in_a_cited_results_file():
    blocks = paragraphs(results_section())
    assert len(blocks) >= 5
    missing = []
    for block in blocks:
        missing += [(block.split("\n", 1)[0][:60], n) for n in checked(block)]
    assert not missing, f"numbers in README's Results that no cited results file holds: {missing}"


def test_the_check_finds_numbers_no_cited_file_holds():
    block = "**X** (`bench/results/transport.md`): a ratio of 123.456 that no run made, 0.5 GB."
    assert checked(block) == ["123.456"] or checked(block) == ["123.456", "0.5"]
    section = results_section()
    paragraph = next(b for b in paragraphs(section) if b.startswith("**Hostile peers**"))
    assert checked(paragraph) == []
    assert checked(paragraph.replace("83.48", "83.58")) == ["83.58"]  # one digit off is caught
