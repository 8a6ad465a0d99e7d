"""The package's shape: layers import only downward, the command line starts without torch,
and the docs' option tables are the ones the declarations generate."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "p2pmoe"
DOCS = Path(__file__).parent.parent / "docs" / "methods.md"

# Lower ranks are lower layers; a module may import its own rank or below.
LAYERS = {
    0: {"wire", "options", "naming", "fsio", "settings", "ledger", "topology", "runs", "plugins", "participation", "seeds", "trackers"},
    1: {"models"},
    2: {"data", "eval"},
    3: {"learners"},
    4: {"tasks"},
    5: {"methods"},
    6: {"config", "experiment", "docs"},
    7: {"driver", "report"},
    8: {"sim", "node", "harness"},
    9: {"cli", "__init__"},
}
RANK = {name: rank for rank, names in LAYERS.items() for name in names}


def _unit(path: Path) -> str:
    """The layer unit of a file: its subpackage, or its module name at the top level."""
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else path.stem


def _imports(tree: ast.AST) -> list[str]:
    """p2pmoe units a module imports anywhere (functions included), except under TYPE_CHECKING."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(child) for child in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names] if isinstance(node, ast.Import) else []
        found += [name.split(".")[1] for name in names if name.startswith("p2pmoe.")]
    return found


def test_every_module_belongs_to_a_layer_and_imports_only_downward():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        unit = _unit(path)
        assert unit in RANK, f"{path} is in no layer: add it to LAYERS"
        for imported in _imports(ast.parse(path.read_text())):
            if RANK[imported] > RANK[unit]:
                violations.append(f"{path.relative_to(PACKAGE)} ({unit}) imports p2pmoe.{imported}")
    assert violations == []


def test_the_command_line_answers_help_without_importing_torch():
    code = (
        "import sys, contextlib, io\nfrom p2pmoe.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n    try: main(['--help'])\n    except SystemExit: pass\n"
        "print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr


def test_the_docs_option_tables_are_generated_from_the_declarations():
    from p2pmoe.docs import BEGIN, END, methods_markdown

    text = DOCS.read_text()
    assert BEGIN in text and END in text, "docs/methods.md lacks the generated options block"
    block = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert block == methods_markdown().strip(), "regenerate with: p2pmoe methods --markdown"
