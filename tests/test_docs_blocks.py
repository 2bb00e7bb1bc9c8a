"""The documentation is true: every ```python block of README.md and docs/*.md runs as written.

Each block is one test (id: page and line), collected from the pages at collection time, so a new
page under docs/ is covered without a change here. A block runs alone (its own namespace), seeded by
the ``seed`` fixture, in a temporary working directory, so the files it writes (``t.safetensors``,
pictures) never land in the repository; ``checkpoints/``, ``docs/`` and ``benchmarks/`` are linked
there, so a block reads them by the paths a reader at the checkout's root uses. A block that needs an optional package (transformers,
matplotlib, tqdm) is skipped, saying which extra installs it, when that package is missing.

Beside the blocks: README stays short and its links lead to files; the README's test command is the
one ``.ci/run`` runs; the pages state the current state (no history, no internal notes) and give
install hints for the checkout, never for a package index.
"""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
SHARED = ("checkpoints", "docs", "benchmarks")  # folders a block may read by their relative path
# optional package -> (how a block shows it needs it, the extra that installs it)
OPTIONAL = {
    "transformers": (("transformers",), "hf"),
    "matplotlib": (("matplotlib", "usim.plot("), "plot"),
    "tqdm": (("tqdm",), "progress"),
    "tracr": (("tracr",), "tracr"),
}


def _listing() -> list[str]:
    return sorted(p.relative_to(ROOT).as_posix() for folder in (ROOT, *(ROOT / n for n in SHARED))
                  for p in folder.iterdir())


def _installed(package: str) -> bool:
    if package in sys.modules:  # None there: imports of it fail (as tests arrange)
        return sys.modules[package] is not None
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def _blocks():
    for page in PAGES:
        text = page.read_text()
        name = page.relative_to(ROOT).as_posix()
        for match in BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 2  # the block's first line of code
            yield pytest.param(name, line, match.group(1), id=f"{name}:{line}")


@pytest.mark.parametrize("page, line, code", list(_blocks()))
def test_block_runs_as_written(page, line, code, seed, tmp_path, monkeypatch):
    for package, (signs, extra) in OPTIONAL.items():
        if any(sign in code for sign in signs) and not _installed(package):
            pytest.skip(f"{page}:{line} needs {package}: pip install -e '.[{extra}]'")
    for name in SHARED:  # read as the reader would from the checkout: checkpoints/..., docs/...
        (tmp_path / name).symlink_to(ROOT / name, target_is_directory=True)
    before = _listing()
    monkeypatch.chdir(tmp_path)  # the block may write files
    try:
        # leading newlines: a traceback names the line of the page itself
        exec(compile("\n" * (line - 1) + code, page, "exec"), {"__name__": "__docs__"})
    except ModuleNotFoundError as e:
        if e.name in OPTIONAL:
            pytest.skip(f"{page}:{line} needs {e.name}: pip install -e '.[{OPTIONAL[e.name][1]}]'")
        raise
    assert _listing() == before, f"{page}:{line} wrote into the repository"


def test_every_page_has_blocks_collected():
    # the pattern matches the pages' fences: a page with a ```python block contributes a test
    for page in PAGES:
        text = page.read_text()
        assert text.count("```python") == len(BLOCK.findall(text)), page


def test_readme_is_short_and_its_links_lead_to_files():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if "://" not in link]
    assert local, "README links to its pages"
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, missing
    mapped = {Path(link).name for link in local if link.startswith("docs/") and link.endswith(".md")}
    assert mapped, "README has a map of the docs"


def test_readme_test_command_is_what_ci_runs():
    text = (ROOT / "README.md").read_text()
    command = next(line for line in text.splitlines() if "pytest" in line and "pip install" in line)
    extras = re.search(r"pip install -e '(\.\[[^\]]*\])'", command).group(1)
    assert "hf" in extras and "test" in extras, "the HF tests must not skip quietly"
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"pip install -q -e '{extras}'" in ci and "python -m pytest -q\n" in ci
    assert command.rstrip().endswith("python -m pytest -q")
    assert "mkdocs build --strict" in ci


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_page_states_the_current_state(page):
    text = page.read_text()
    for pattern in (r"\bwas\b", r"this session", r"\bissues?\b", r"\blent\b", r"pip install '?usim\["):
        found = re.search(pattern, text, re.I)
        assert not found, f"{page.name}: {text[max(0, found.start() - 60): found.end() + 60]!r}"
