"""The shipped cluster launcher YAMLs: Ray's own validator, offline, plus the rules Ray's validator omits.

`prepare_config` (merge with the provider's defaults.yaml, fill node-type worker counts) and `validate_config`
(Ray's JSON schema and its own cross-checks) only read local files; the cloud bootstrap (`bootstrap_config`, which
creates security groups, IAM roles, key pairs) is never called. A guard fails the test on any network use.
"""

from __future__ import annotations

import copy
import re
import socket
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_YAMLS = [ROOT / "cluster.yaml", *sorted((ROOT / "configs").glob("cluster*.yaml"))]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to resolve or reach a host (a cloud API) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network use while validating a cluster YAML: {args!r}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def readme_install_commands() -> list[str]:
    """The install steps of the README's Quickstart: its first command block, minus the run itself."""
    section = ROOT.joinpath("README.md").read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    first_block = re.findall(r"```bash\n(.*?)```", section, flags=re.S)[0]
    return [part.strip() for part in first_block.split("&&") if part.strip().startswith("pip install")]


def shell_steps(commands: list[str]) -> list[tuple[str, str | None]]:
    """(step, working directory) for every `&&`/`;`-separated step of a list of shell commands."""
    steps = []
    for command in commands:
        cwd = None  # each setup command runs in a fresh shell, in the home directory
        for step in re.split(r"&&|;", command):
            step = step.strip()
            if step.startswith("cd "):
                cwd = step[3:].strip()
            elif step:
                steps.append((step, cwd))
    return steps


def gpu_node_types(config: dict) -> dict[str, dict]:
    """Node types that bring a GPU: declared GPU resources, an AWS g*/p* instance, or a GCP accelerator."""
    found = {}
    for name, node in config["available_node_types"].items():
        node_config = node.get("node_config", {})
        if (node.get("resources", {}).get("GPU", 0) > 0
                or re.match(r"[gp]\d", node_config.get("InstanceType", ""))
                or node_config.get("guestAccelerators")):
            found[name] = node
    return found


def is_spot(node_config: dict) -> bool:
    aws = node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    scheduling = node_config.get("scheduling", {})
    gcp = isinstance(scheduling, dict) and (scheduling.get("provisioningModel") == "SPOT"
                                            or scheduling.get("preemptible") is True)
    return aws or gcp


def home(config: dict) -> str:
    return f"/home/{config['auth']['ssh_user']}"


def expand(path: str, config: dict) -> str:
    return home(config) + path[1:] if path.startswith("~") else path


def cluster_problems(config: dict) -> list[str]:
    """What Ray's validator does not check but this project requires of a cluster YAML (empty: all good)."""
    problems = []
    provider = config.get("provider", {})
    if not provider.get("region"):
        problems.append("provider.region: must be set (prices, spot capacity and the run_dir bucket depend on it)")
    if provider.get("type") == "gcp" and not (provider.get("project_id") and provider.get("availability_zone")):
        problems.append("provider: GCP needs project_id and availability_zone")
    for name, node in config["available_node_types"].items():
        low, high = node.get("min_workers", 0), node.get("max_workers", config.get("max_workers", 0))
        if low > high:
            problems.append(f"available_node_types.{name}: min_workers {low} > max_workers {high}")
    head = config["available_node_types"][config["head_node_type"]]
    if head.get("resources", {}).get("CPU") != 0:
        problems.append(f"available_node_types.{config['head_node_type']}.resources: the head must have CPU: 0")
    gpus = gpu_node_types(config)
    if not gpus:
        problems.append("available_node_types: no GPU worker type")
    for name, node in gpus.items():
        if node.get("min_workers", 0) != 0 or node.get("max_workers", 0) < 1:
            problems.append(f"available_node_types.{name}: a GPU type must scale from min_workers 0 to max_workers ≥ 1")
        if not is_spot(node["node_config"]):
            problems.append(f"available_node_types.{name}: GPU workers should be spot")
    if not isinstance(config.get("idle_timeout_minutes"), int) or config["idle_timeout_minutes"] <= 0:
        problems.append("idle_timeout_minutes: must be set to a positive number of minutes")

    head_start = " ".join(config.get("head_start_ray_commands", []))
    if "ray start --head" not in head_start or "--dashboard-host=127.0.0.1" not in head_start:
        problems.append("head_start_ray_commands: the dashboard must be bound with --dashboard-host=127.0.0.1")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in config.get(key, []) if "ray start" in c]
        for env in ("RAY_AUTH_MODE=token", "RAY_USAGE_STATS_ENABLED=0"):
            if not start or not all(env in c for c in start):
                problems.append(f"{key}: every `ray start` needs {env} in its environment")
    mounts = {expand(remote, config): local for remote, local in config.get("file_mounts", {}).items()}
    if mounts.get(f"{home(config)}/.ray/auth_token") != "~/.ray/auth_token":
        problems.append("file_mounts: the token ~/.ray/auth_token must be copied to ~/.ray/auth_token on every node")
    for rule in provider.get("security_group", {}).get("IpPermissions", []):
        problems.append(f"provider.security_group.IpPermissions: opens {rule} beyond SSH and intra-cluster traffic")

    synced = [remote for remote, local in mounts.items() if local == "."]
    steps = shell_steps(config.get("setup_commands", []))
    if not any("python3 -m venv" in step for step, _ in steps):
        problems.append("setup_commands: no virtual environment (the README installs into one)")
    position = -1
    for command in readme_install_commands():
        hits = [i for i, (step, cwd) in enumerate(steps) if step == command]
        if not hits or hits[0] < position:
            problems.append(f"setup_commands: missing README install step {command!r} (in the README's order)")
            continue
        position = hits[0]
        cwd = steps[position][1]
        if command.endswith(" .") and (cwd is None or expand(cwd, config) not in synced):
            problems.append(f"setup_commands: {command!r} must run in the synced working tree {synced}")
    return problems


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_ray_validator_accepts_the_prepared_config(path):
    prepared = prepare_config(load(path))
    validate_config(prepared)
    # prepare_config merges setup_commands into both node kinds: head and workers install the same project.
    assert prepared["head_setup_commands"][: len(prepared["setup_commands"])] == prepared["setup_commands"]
    assert prepared["worker_setup_commands"][: len(prepared["setup_commands"])] == prepared["setup_commands"]


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_project_rules_hold(path):
    raw = load(path)
    assert cluster_problems(raw) == []
    # The defaults Ray merges in must not undo them (e.g. a head max_workers or a default --dashboard-host=0.0.0.0).
    assert cluster_problems(prepare_config(raw)) == []


def test_every_cluster_yaml_is_checked_here():
    shipped = {p.name for p in ROOT.glob("*.yaml")} | {p.name for p in (ROOT / "configs").glob("cluster*.yaml")}
    assert shipped == {p.name for p in CLUSTER_YAMLS} and "cluster.yaml" in shipped


def test_readme_install_steps_are_found():
    # The check above is only as good as what it compares against: the Quickstart's two install steps.
    assert readme_install_commands() == ["pip install torch==2.13.0", "pip install -e ."]


def test_ray_misses_min_above_max_and_a_missing_region_but_we_catch_them():
    broken = load(ROOT / "cluster.yaml")
    broken["available_node_types"]["gpu_worker"].update(min_workers=3, max_workers=2)
    del broken["provider"]["region"]
    validate_config(prepare_config(copy.deepcopy(broken)))  # Ray's validator lets both through
    assert cluster_problems(broken)[:2] == [
        "provider.region: must be set (prices, spot capacity and the run_dir bucket depend on it)",
        "available_node_types.gpu_worker: min_workers 3 > max_workers 2",
    ]


@pytest.mark.parametrize("edit, problem", [
    (lambda c: c["available_node_types"]["head"].update(resources={"CPU": 4}),
     "available_node_types.head.resources: the head must have CPU: 0"),
    (lambda c: c["available_node_types"]["gpu_worker"].update(min_workers=1),
     "available_node_types.gpu_worker: a GPU type must scale from min_workers 0 to max_workers ≥ 1"),
    (lambda c: c["available_node_types"]["gpu_worker"]["node_config"].pop("InstanceMarketOptions"),
     "available_node_types.gpu_worker: GPU workers should be spot"),
    (lambda c: c.update(head_start_ray_commands=[s.replace("127.0.0.1", "0.0.0.0")
                                                 for s in c["head_start_ray_commands"]]),
     "head_start_ray_commands: the dashboard must be bound with --dashboard-host=127.0.0.1"),
    (lambda c: c.update(worker_start_ray_commands=[s.replace("RAY_AUTH_MODE=token ", "")
                                                   for s in c["worker_start_ray_commands"]]),
     "worker_start_ray_commands: every `ray start` needs RAY_AUTH_MODE=token in its environment"),
    (lambda c: c["provider"]["security_group"]["IpPermissions"].append(
        {"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}),
     ("provider.security_group.IpPermissions: opens {'FromPort': 8265, 'ToPort': 8265, 'IpProtocol': 'tcp', "
      "'IpRanges': [{'CidrIp': '0.0.0.0/0'}]} beyond SSH and intra-cluster traffic")),
    (lambda c: c.update(setup_commands=[s.replace("cd ~/nullbooth && ", "") for s in c["setup_commands"]]),
     "setup_commands: 'pip install -e .' must run in the synced working tree ['/home/ubuntu/nullbooth']"),
    (lambda c: c.update(setup_commands=[s.replace("torch==2.13.0", "torch") for s in c["setup_commands"]]),
     "setup_commands: missing README install step 'pip install torch==2.13.0' (in the README's order)"),
    (lambda c: c["file_mounts"].pop("/home/ubuntu/.ray/auth_token"),
     "file_mounts: the token ~/.ray/auth_token must be copied to ~/.ray/auth_token on every node"),
])
def test_each_rule_catches_its_mistake(edit, problem):
    config = load(ROOT / "cluster.yaml")
    edit(config)
    assert cluster_problems(config) == [problem]
