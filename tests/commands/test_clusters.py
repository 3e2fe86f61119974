"""Offline checks of the `ray up` files in clusters/ (no cloud, no boto3, no Ray runtime)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from cliptd.clusters import DRIVER_RESOURCE, check_project_rules, main, validate_cluster_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER_FILES = sorted((REPO / "clusters").glob("*.yaml"))
IDS = [p.name for p in CLUSTER_FILES]


@pytest.fixture(scope="module")
def schema() -> dict:
    path = os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")
    with open(path) as f:
        return json.load(f)


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def write(tmp_path: Path, cfg: dict, name: str = "cluster.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def test_the_cluster_files_exist():
    names = {p.name for p in CLUSTER_FILES}
    assert {"gpu.yaml", "local.yaml"} <= names


# --- Ray's own machinery, called directly ----------------------------------------------


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=IDS)
def test_ray_schema_accepts(path, schema):
    jsonschema.validate(load(path), schema)


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=IDS)
def test_ray_prepare_and_validate_config_accept(path):
    """What `ray up` runs before it touches a cloud."""
    prepared = prepare_config(copy.deepcopy(load(path)))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


# --- cliptd's rules ------------------------------------------------------------------------


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=IDS)
def test_validate_cluster_config_accepts(path):
    cfg = validate_cluster_config(path)
    assert cfg["cluster_name"].startswith("cliptd")


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=IDS)
def test_images_pin_the_installed_ray(path):
    cfg = load(path)
    images = [cfg["docker"]["image"]] + [
        cfg["docker"][k] for k in ("head_image", "worker_image") if k in cfg["docker"]
    ]
    for image in images:
        assert image.startswith(f"rayproject/ray:{ray.__version__}-py311-"), image


def test_gpu_yaml_shape():
    """CPU head with the driver resource, GPU workers (one spot), autoscaling limits."""
    cfg = load(REPO / "clusters" / "gpu.yaml")
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get(DRIVER_RESOURCE, 0) >= 1
    assert head["resources"].get("GPU", 0) == 0
    workers = {n: t for n, t in types.items() if n != cfg["head_node_type"]}
    assert workers
    for name, t in workers.items():
        assert DRIVER_RESOURCE not in t["resources"], name
        assert t["resources"].get("GPU", 0) >= 1, name
        assert t["max_workers"] <= cfg["max_workers"]
    assert any(
        t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
        for t in workers.values()
    )
    assert sum(t.get("min_workers", 0) for t in workers.values()) <= cfg["max_workers"]
    assert cfg["idle_timeout_minutes"] > 0


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=IDS)
def test_loopback_token_auth_and_shared_storage(path):
    cfg = load(path)
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "mlflow server" in head and "--host 127.0.0.1 --port 5000" in head
    for cmd in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert "RAY_AUTH_MODE=token" in cmd
    assert "~/.ray/auth_token" in cfg["file_mounts"]
    assert cfg["file_mounts"]["~/cliptd"] == "."
    setup = " ".join(cfg["setup_commands"])
    assert "CLIPTD_STORAGE_PATH" in setup
    assert "pip install -e ~/cliptd" in setup


# --- negative cases: rejected with a message naming the file and the field ----------------


@pytest.fixture
def gpu_cfg() -> dict:
    return load(REPO / "clusters" / "gpu.yaml")


def test_missing_provider_is_rejected(tmp_path, gpu_cfg):
    del gpu_cfg["provider"]
    p = write(tmp_path, gpu_cfg)
    with pytest.raises(ValueError, match=r"cluster\.yaml: provider: required field is missing"):
        validate_cluster_config(p)


def test_misspelled_top_level_key_is_rejected(tmp_path, gpu_cfg):
    gpu_cfg["max_worker"] = gpu_cfg.pop("max_workers")
    p = write(tmp_path, gpu_cfg)
    with pytest.raises(ValueError) as e:
        validate_cluster_config(p)
    msg = str(e.value)
    assert str(p) in msg and "max_worker: unknown field" in msg
    assert "did you mean 'max_workers'" in msg


def test_misspelled_node_type_key_is_rejected(tmp_path, gpu_cfg):
    t = gpu_cfg["available_node_types"]["ray.worker.gpu.spot"]
    t["resource"] = t.pop("resources")
    p = write(tmp_path, gpu_cfg)
    with pytest.raises(ValueError, match=r"ray\.worker\.gpu\.spot"):
        validate_cluster_config(p)


def test_head_type_missing_from_node_types_is_rejected(tmp_path, gpu_cfg):
    gpu_cfg["head_node_type"] = "ray.head.nope"
    p = write(tmp_path, gpu_cfg)
    with pytest.raises(ValueError, match=r"head_node_type. must be one of"):
        validate_cluster_config(p)


def test_min_workers_above_max_workers_is_rejected(tmp_path, gpu_cfg):
    gpu_cfg["available_node_types"]["ray.worker.gpu.spot"]["min_workers"] = 99
    p = write(tmp_path, gpu_cfg)
    with pytest.raises(ValueError, match=r"max_workers"):
        validate_cluster_config(p)


def test_wrong_ray_version_in_image_is_rejected(tmp_path, gpu_cfg):
    gpu_cfg["docker"]["image"] = "rayproject/ray:2.49.0-py311-gpu"
    p = write(tmp_path, gpu_cfg)
    with pytest.raises(ValueError, match=rf"docker\.image: .*installed ray is {ray.__version__}"):
        validate_cluster_config(p)


def test_driver_resource_on_a_worker_is_rejected(gpu_cfg):
    gpu_cfg["available_node_types"]["ray.worker.gpu.spot"]["resources"][DRIVER_RESOURCE] = 1
    with pytest.raises(ValueError, match=r"ray\.worker\.gpu\.spot\.resources"):
        check_project_rules(gpu_cfg, "gpu.yaml")


def test_head_without_driver_resource_is_rejected(gpu_cfg):
    del gpu_cfg["available_node_types"]["ray.head.cpu"]["resources"][DRIVER_RESOURCE]
    with pytest.raises(ValueError, match=DRIVER_RESOURCE):
        check_project_rules(gpu_cfg, "gpu.yaml")


def test_gpu_worker_without_gpu_resource_is_rejected(gpu_cfg):
    del gpu_cfg["available_node_types"]["ray.worker.gpu.ondemand"]["resources"]["GPU"]
    with pytest.raises(ValueError, match=r"ray\.worker\.gpu\.ondemand.*GPU >= 1"):
        check_project_rules(gpu_cfg, "gpu.yaml")


def test_public_dashboard_is_rejected(gpu_cfg):
    cmds = gpu_cfg["head_start_ray_commands"]
    gpu_cfg["head_start_ray_commands"] = [
        c.replace("--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0") for c in cmds
    ]
    with pytest.raises(ValueError, match=r"--dashboard-host"):
        check_project_rules(gpu_cfg, "gpu.yaml")


def test_public_mlflow_is_rejected(gpu_cfg):
    cmds = gpu_cfg["head_start_ray_commands"]
    gpu_cfg["head_start_ray_commands"] = [
        c.replace("--host 127.0.0.1", "--host 0.0.0.0") for c in cmds
    ]
    with pytest.raises(ValueError, match=r"MLflow must bind"):
        check_project_rules(gpu_cfg, "gpu.yaml")


def test_missing_token_auth_is_rejected(gpu_cfg):
    gpu_cfg["docker"]["run_options"] = ["--ulimit nofile=65536:65536"]
    gpu_cfg["worker_start_ray_commands"] = [
        c.replace("RAY_AUTH_MODE=token ", "") for c in gpu_cfg["worker_start_ray_commands"]
    ]
    with pytest.raises(ValueError, match=r"worker_start_ray_commands: .*RAY_AUTH_MODE=token"):
        check_project_rules(gpu_cfg, "gpu.yaml")


def test_unreadable_and_invalid_yaml_are_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"nope\.yaml: <file>"):
        validate_cluster_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster_name: [unclosed\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: <yaml>: not valid YAML"):
        validate_cluster_config(bad)


# --- the CLI ----------------------------------------------------------------------------------


def test_cli_accepts_the_shipped_files(capsys):
    assert main(["validate", *map(str, CLUSTER_FILES)]) == 0
    out = capsys.readouterr().out
    assert all(f"OK {p}" in out for p in CLUSTER_FILES)


def test_cli_exits_1_with_one_line(tmp_path, gpu_cfg):
    del gpu_cfg["provider"]
    p = write(tmp_path, gpu_cfg)
    proc = subprocess.run(
        [sys.executable, "-m", "cliptd.clusters", "validate", str(p)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert str(p) in lines[0] and "provider" in lines[0]
