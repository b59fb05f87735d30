"""The docs stay true: the README's config reference is generated from the dataclasses, and CI runs the README's
test command."""

import re
from pathlib import Path

from nullbooth.config import reference_table

ROOT = Path(__file__).resolve().parent.parent


def quickstart_commands() -> list[str]:
    section = ROOT.joinpath("README.md").read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_readme_config_reference_matches_the_dataclasses():
    readme = ROOT.joinpath("README.md").read_text()
    table = readme.split("<!-- config-reference:start -->\n", 1)[1].split("\n<!-- config-reference:end -->", 1)[0]
    assert table == reference_table(), "regenerate the README table from nullbooth.config.reference_table()"


def test_quickstart_is_two_commands_and_ci_runs_the_test_command_after_pinning_torch():
    install_and_run, test = quickstart_commands()
    assert install_and_run.startswith("pip install torch==2.13.0")
    ci = ROOT.joinpath(".ci", "run").read_text()
    assert test in ci.splitlines()
    assert ci.index("pip install torch==2.13.0") < ci.index(test)


def test_the_readme_test_command_leaves_no_test_out():
    """The slow `cluster` tests are part of the one test command CI runs: nothing deselects them."""
    _, test = quickstart_commands()
    pytest_args = test.split("pytest", 1)[1]
    assert not re.search(r"(^|\s)(-m|-k|--ignore|--deselect)\b", pytest_args), pytest_args
    pyproject = ROOT.joinpath("pyproject.toml").read_text()
    [addopts] = re.findall(r'^addopts = "(.*)"$', pyproject, flags=re.M)
    assert not re.search(r"(^|\s)(-m|-k|--ignore|--deselect)\b", addopts)
    assert re.search(r'^markers = \[\n\s+"cluster: ', pyproject, flags=re.M)  # registered, so a typo fails
    marked = {p.name for p in ROOT.joinpath("tests").glob("test_*.py") if "pytest.mark.cluster" in p.read_text()}
    assert {"test_multinode.py", "test_autoscaling.py", "test_stats_job.py"} <= marked


def test_every_a10g_hours_figure_says_it_is_an_estimate():
    """No A10G has run the SD1.5 statistics for these docs: the A10G-hours figure is worked out from an assumed
    throughput (docs/operations.md, section 7), and every sentence that quotes it must say so."""
    sentences = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = " ".join(path.read_text().split())  # one line, so a sentence wrapped over lines stays whole
        sentences += [(path.name, s) for s in re.split(r"(?<=[.;])\s+|\s-\s", text) if "A10G-hour" in s]
    assert len(sentences) >= 3
    assert [(name, s) for name, s in sentences if "estimat" not in s] == []
