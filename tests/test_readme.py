"""The README as a user meets it: its research-code example runs as written and prints the
exact peak times of the default problem, and every link it makes resolves inside the
repository."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()

# docs/method.md, "The paper's default problem": peak t/T of the entropy rate, by quadrature
EXACT_PEAKS = {"all four": 0.573, "{-8,-4} vs {6,8}": 0.590, "6 vs 8": 0.199}


def research_example() -> str:
    section = README.split("## From research code", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_research_code_example_runs_and_prints_the_exact_peak_times(tmp_path):
    code = research_example()
    assert len(code.strip().splitlines()) <= 20, "the example should stay short"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    # the README shows what it prints (numbers to the rounding of the last digit)
    section = README.split("## From research code", 1)[1]
    shown = re.search(r"It prints.*?```\n(.*?)```", section, re.S).group(1)
    numbers = lambda text: [float(x) for x in re.findall(r"\d+\.\d+", text)]  # noqa: E731
    assert len(numbers(shown)) == len(numbers(r.stdout)) > 0
    assert max(abs(a - b) for a, b in zip(numbers(shown), numbers(r.stdout))) <= 0.0015
    lines = {line.split("  ")[0].strip(): line for line in r.stdout.splitlines() if "peak:" in line}
    assert set(lines) == set(EXACT_PEAKS)
    for name, peak in EXACT_PEAKS.items():
        found = re.search(r"exact ([\d.]+), forward MC ([\d.]+), online ([\d.]+) \(95% CI ([\d.]+)-([\d.]+)\)",
                          lines[name])
        exact, fmc, online, lo, hi = map(float, found.groups())
        assert exact == pytest.approx(peak, abs=0.0021), name
        assert abs(fmc - peak) < 0.05 and abs(online - peak) < 0.05, name
        assert lo <= online <= hi


def _links(text: str) -> list[str]:
    return [m for m in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+://|#|mailto:", m)]


@pytest.mark.parametrize("doc", ["README.md", "docs/method.md", "benchmarks/README.md", "checkpoints/README.md"])
def test_every_link_resolves_inside_the_repository(doc):
    path = REPO / doc
    for link in _links(path.read_text()):
        target = (path.parent / link.split("#")[0]).resolve()
        assert target.exists(), f"{doc} links to {link}, which does not exist"
        assert REPO in target.parents or target == REPO, f"{doc} links to {link}, outside the repository"


OUTSIDE = "../" + "shared"  # the folder beside a working copy, which a clone does not have


def test_nothing_points_outside_the_repository():
    for folder in ("jaxdiff_info", "experiments", "tests", "benchmarks", "docs"):
        for path in (REPO / folder).rglob("*"):
            if path.suffix in (".py", ".md") and path.name != Path(__file__).name:
                assert OUTSIDE not in path.read_text(), f"{path.relative_to(REPO)} points outside the repository"
    assert OUTSIDE not in README
