"""The README's library example and the user guide's code blocks run as written.

The blocks are read from the markdown files themselves, so a change of the API that breaks the
docs breaks this test. A block preceded by ``<!-- not run by tests/test_docs.py ... -->`` is
left out (it trains victims for a minute; the guide says so).
"""

import re
from pathlib import Path

import pytest

from jaxpoison import models, objectives, poisons, transforms
from jaxpoison.evaluation import risk

REPO = Path(__file__).resolve().parents[1]
NOT_RUN = "<!-- not run by tests/test_docs.py"

# Logic, not numbers: XLA's cheaper compiles (the README example compiles a CNN's init, step and
# evaluation; its own sizes keep the run itself to seconds).
pytestmark = pytest.mark.usefixtures("fast_compiles")


def python_blocks(path):
    """The ```python blocks of a markdown file, in order, without those marked `NOT_RUN`."""
    pattern = re.compile(r"^(<!--[^\n]*-->\n)?```python\n(.*?)^```", re.M | re.S)
    return [
        m.group(2)
        for m in pattern.finditer(path.read_text())
        if not (m.group(1) or "").startswith(NOT_RUN)
    ]


@pytest.fixture
def registries():
    """Restores every registry the guide's blocks register into."""
    dicts = [(r, dict(r)) for r in (poisons.POISONS, objectives.OBJECTIVES, models.MODELS)]
    dicts += [(r, dict(r)) for r in (risk.EVALUATORS, transforms.TRANSFORMS)]
    sets = [
        (s, set(s)) for s in (poisons.REQUIRES_MODEL, poisons.UNBOUNDED, transforms.MIXES_LABELS)
    ]
    yield
    for registry, saved in dicts + sets:
        registry.clear()
        registry.update(saved)


def test_readme_has_one_library_example():
    assert len(python_blocks(REPO / "README.md")) == 1


def test_readme_library_example_runs(capsys):
    (example,) = python_blocks(REPO / "README.md")
    exec(compile(example, "README.md", "exec"), {"__name__": "readme_example"})
    out = capsys.readouterr().out
    assert re.search(r"^clean: clean test accuracy \d+\.\d%$", out, re.M), out
    assert re.search(r"^poisoned: clean test accuracy \d+\.\d%$", out, re.M), out


def test_guide_blocks_run_in_order(registries):
    blocks = python_blocks(REPO / "docs" / "guide.md")
    assert len(blocks) >= 5  # model, poison, objective, evaluator, bi-level
    namespace = {"__name__": "guide_example"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/guide.md, python block {i + 1}", "exec"), namespace)
    assert {"small_bn", "pgd_noise", "smooth", "median3", "confidence"} <= (
        set(models.MODELS)
        | set(poisons.POISONS)
        | set(objectives.OBJECTIVES)
        | set(transforms.TRANSFORMS)
        | set(risk.EVALUATORS)
    )


def test_guide_blocks_left_out_still_compile():
    text = (REPO / "docs" / "guide.md").read_text()
    left_out = re.findall(
        r"^<!-- not run by tests/test_docs\.py[^\n]*-->\n```python\n(.*?)^```", text, re.M | re.S
    )
    for block in left_out:
        compile(block, "docs/guide.md", "exec")
