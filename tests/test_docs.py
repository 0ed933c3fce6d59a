"""The README and docs/: links point at files and headings that exist, the figures are small and
used, the quick-start commands stay as written, and the README's Python example runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
QUICK_START = ("python3.11 -m venv .venv && . .venv/bin/activate && pip install -e . && "
               "learned-opt meta-train --out runs/quickstart")
TEST_COMMAND = ('python3.11 -m venv .venv && . .venv/bin/activate && pip install -e ".[test]" && '
                "python -m pytest -q")


def _without_code(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.DOTALL)


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, links and punctuation dropped, spaces -> '-'."""
    out = set()
    for line in _without_code(page.read_text()).splitlines():
        if line.startswith("#"):
            text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", line.lstrip("#").strip())
            out.add(re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-"))
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_point_at_existing_files_and_headings(page):
    for target in LINK.findall(_without_code(page.read_text())):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: {target} does not exist"
        if anchor:
            assert anchor in _anchors(file), f"{page.name}: no heading #{anchor} in {file.name}"


def test_figures_are_small_and_each_is_shown():
    shown = " ".join(p.read_text() for p in PAGES)
    for figure in sorted((ROOT / "docs" / "figures").iterdir()):
        assert figure.stat().st_size < 150_000, f"{figure.name}: re-save it smaller"
        assert f"figures/{figure.name}" in shown, f"{figure.name} is not used by any page"


def test_readme_keeps_the_quick_start_commands():
    readme = (ROOT / "README.md").read_text()
    assert f"```bash\n{QUICK_START}\n```" in readme
    assert f"```bash\n{TEST_COMMAND}\n```" in readme
    assert TEST_COMMAND in (ROOT / ".ci" / "run").read_text()  # what CI runs


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path, tfds_data_dir):
    import jax
    import numpy as np

    import learned_opt

    (code,) = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    lopt = learned_opt.MLPLOpt()
    path = tmp_path / "learned_optimizer.lopt"
    learned_opt.save(path, lopt, lopt.init(jax.random.key(0)))
    assert "runs/quickstart/learned_optimizer.lopt" in code
    scope: dict = {}
    exec(code.replace("runs/quickstart/learned_optimizer.lopt", str(path)), scope)
    leaves = jax.tree.leaves(scope["meta_grad"])
    assert [x.shape for x in leaves] == [x.shape for x in jax.tree.leaves(scope["theta"])]
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves)
    assert int(scope["metrics"]["inner_steps"]) == 2 * 8 * 10
