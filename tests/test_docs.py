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
