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


def research_examples() -> list[str]:
    """The python blocks of "From research code", in order; each later one continues the first."""
    section = README.split("## From research code", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def research_example() -> str:
    return research_examples()[0]


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


@pytest.mark.slow  # 40-90 s: compiles a U-Net inside the tracking loop
def test_the_network_example_runs_on_a_checkpoint(monkeypatch, capsys):
    """The second example as written, on an untrained micro U-Net of the digits' shape standing
    in for the checkpoint (load_checkpoint itself is tested in test_training.py)."""
    import jax

    from jaxdiff_info import training, unet

    first, network_example = research_examples()[:2]
    assert 'load_checkpoint("checkpoints/tiny-digits")' in network_example
    config = unet.UNetConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0,
                             num_classes=10, image_size=8, channels=1, num_groups=4)
    model = training.LoadedModel(config=config, config_name="micro", params=unet.init_params(config, jax.random.key(0)),
                                 step=0, dataset="digits", num_train_steps=1, class_names=tuple("0123456789"),
                                 decision_problems={})
    monkeypatch.setattr(training, "load_checkpoint", lambda directory: model)
    setup = first.split("schedule = ", 1)[0]  # the imports of the first example
    exec(setup + network_example, {})
    printed = capsys.readouterr().out
    assert "online classifier" in printed and "posterior: state (DDPM approximation)" in printed
    peak = float(re.search(r"peak t/T: \[([\d.]+)\]", printed).group(1))
    assert 0 < peak <= 1


def test_the_reference_example_runs_and_its_two_estimators_agree(tmp_path):
    """The third example as written (digits, exact Gaussian reference): online and forward Monte
    Carlo half-entropy times agree on every problem, as the README says, and the lines it shows
    are lines it prints."""
    first, _, reference_example = research_examples()[:3]
    code = first.split("exact = ", 1)[0] + reference_example  # the first example's imports and schedule
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = re.findall(r"^(.+?) +half of H resolved at t/T: online ([\d.]+), forward MC ([\d.]+)$", r.stdout, re.M)
    assert len(rows) == 15  # the digits' five pairs and ten one-vs-rest problems
    assert max(abs(float(a) - float(b)) for _, a, b in rows) <= 0.02
    section = README.split("## From research code", 1)[1]
    shown = re.search(r"```\n(1 vs 8 .*?)```", section, re.S).group(1)
    printed = {name.strip(): (float(a), float(b)) for name, a, b in rows}
    for line in shown.splitlines():
        if line != "...":  # numbers to the rounding of the last digit
            name, a, b = re.match(r"(.+?) +half of H resolved at t/T: online ([\d.]+), forward MC ([\d.]+)$",
                                  line).groups()
            assert printed[name] == pytest.approx((float(a), float(b)), abs=0.0015), line


def test_every_spec_file_the_readme_runs_is_in_the_repository():
    specs = set(re.findall(r"--spec ([\w./-]+\.json)", README)) - {"FILE.json"}
    assert specs, "the README runs no --spec file"
    for spec in specs:
        assert (REPO / spec).is_file(), f"README runs --spec {spec}, which the repository does not have"


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
