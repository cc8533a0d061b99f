"""The engine never imports Textual; the UI never imports MLX (as Harlequin enforces)."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "permeant_tui"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_engine_imports_no_textual():
    offenders = [str(p) for p in (PKG / "engine").rglob("*.py") if "textual" in _imports(p)]
    assert (PKG / "engine" / "worker.py").exists()
    assert offenders == []


def test_ui_imports_no_mlx():
    ui = [PKG / "app.py", *(PKG / "screens").rglob("*.py"), *(PKG / "widgets").rglob("*.py")]
    offenders = [str(p) for p in ui if p.exists() and {"mlx", "mlx_lm"} & _imports(p)]
    assert offenders == []


def test_hygiene_check_detects_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from textual.app import App\n")
    assert "textual" in _imports(bad)
