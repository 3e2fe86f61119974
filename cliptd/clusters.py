"""Offline validation of the `ray up` cluster files in clusters/.

Runs Ray's own checks, the ones `ray up` runs before it touches a cloud (no boto3, no
network): the YAML is checked against ``ray/autoscaler/ray-schema.json`` shipped in the
installed ray package, then ``validate_config(prepare_config(cfg))``. On top of that come
cliptd's own rules for its clusters:

- every docker image is ``rayproject/ray:<installed ray version>-py311-...``;
- the head advertises the custom resource ``cliptd_driver`` and no worker does;
- GPU worker types advertise GPUs, and a cloud cluster has at least one;
- the Ray dashboard and MLflow bind to 127.0.0.1 (reach them through SSH tunnels);
- every ``ray start`` runs with ``RAY_AUTH_MODE=token`` and the token is file-mounted;
- ``CLIPTD_STORAGE_PATH`` (shared storage) is set on every node.

Usage::

    python -m cliptd.clusters validate clusters/gpu.yaml [more.yaml ...]
"""

from __future__ import annotations

import argparse
import copy
import difflib
import json
import logging
import os
import re
import shlex
import sys
from pathlib import Path

import yaml

from cliptd.core.invocation import prog

DRIVER_RESOURCE = "cliptd_driver"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
GPU_INSTANCE_PATTERN = re.compile(
    # AWS GPU families (g4dn, g5, g6, g6e, p3, p4d, p5, ...) and GCP accelerator machine types.
    r"^(g\d+[a-z]*|p\d+[a-z]*)\.|^(a2|a3|g2)-"
)
IMAGE_PATTERN = re.compile(r"^rayproject/ray:(?P<version>\d+\.\d+\.\d+)-(?P<rest>.+)$")


def _ray_schema() -> dict:
    import ray.autoscaler

    path = os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")
    with open(path) as f:
        return json.load(f)


def _fail(path: Path | str, field: str, message: str) -> ValueError:
    return ValueError(f"{path}: {field}: {message}")


def _schema_error(path: Path | str, err) -> ValueError:
    """Turn a jsonschema.ValidationError into a one-line ValueError naming the field."""
    where = ".".join(str(p) for p in err.absolute_path)
    if err.validator == "required":
        m = re.match(r"'(.+)' is a required property", err.message)
        name = m.group(1) if m else err.message
        field = f"{where}.{name}" if where else name
        return _fail(path, field, f"required field is missing ({err.message})")
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        known = set(err.schema.get("properties", {}))
        if err.schema.get("patternProperties"):
            known = set()
        unknown = sorted(set(err.instance) - known) if known else []
        if unknown:
            name = unknown[0]
            field = f"{where}.{name}" if where else name
            hint = difflib.get_close_matches(name, sorted(known), n=1)
            did_you_mean = f"; did you mean '{hint[0]}'?" if hint else ""
            return _fail(path, field, f"unknown field (misspelled?){did_you_mean}")
    return _fail(path, where or "<top level>", err.message)


def _commands(cfg: dict, key: str) -> list[str]:
    cmds = cfg.get(key) or []
    return [c for c in cmds if isinstance(c, str)]


def _ray_start_commands(cmds: list[str]) -> list[str]:
    return [c for c in cmds if re.search(r"\bray start\b", c)]


def _resources_flag(cmd: str) -> dict:
    """The JSON of `ray start --resources=...` in a shell command, or {}."""
    try:
        tokens = shlex.split(cmd)
    except ValueError:
        return {}
    for i, tok in enumerate(tokens):
        value = None
        if tok.startswith("--resources="):
            value = tok.split("=", 1)[1]
        elif tok == "--resources" and i + 1 < len(tokens):
            value = tokens[i + 1]
        if value is not None:
            try:
                return json.loads(value)
            except json.JSONDecodeError:
                return {}
    return {}


def _flag_value(cmd: str, flag: str) -> str | None:
    m = re.search(rf"{re.escape(flag)}[= ]+['\"]?([^'\"\s;]+)", cmd)
    return m.group(1) if m else None


def _images(cfg: dict) -> list[tuple[str, str]]:
    out = []
    docker = cfg.get("docker") or {}
    for key in ("image", "head_image", "worker_image"):
        if docker.get(key):
            out.append((f"docker.{key}", docker[key]))
    for name, node_type in (cfg.get("available_node_types") or {}).items():
        image = (node_type.get("docker") or {}).get("worker_image")
        if image:
            out.append((f"available_node_types.{name}.docker.worker_image", image))
    return out


def _instance_type(node_type: dict) -> str:
    nc = node_type.get("node_config") or {}
    return str(nc.get("InstanceType") or nc.get("machineType") or "")


def _is_gpu_type(name: str, node_type: dict) -> bool:
    nc = node_type.get("node_config") or {}
    return bool(
        "gpu" in name.lower()
        or GPU_INSTANCE_PATTERN.search(_instance_type(node_type))
        or nc.get("guestAccelerators")
    )


def check_project_rules(cfg: dict, path: Path | str = "<config>") -> None:
    """cliptd's own rules; `cfg` is the config as written (before prepare_config)."""
    import ray

    provider = (cfg.get("provider") or {}).get("type")
    docker = cfg.get("docker") or {}
    docker_env = " ".join(
        str(o) for key in ("run_options", "head_run_options") for o in docker.get(key) or []
    )

    # Image tags pin the installed Ray version (and Python 3.11).
    for field, image in _images(cfg):
        m = IMAGE_PATTERN.match(image)
        if not m:
            raise _fail(path, field, f"image {image!r} is not rayproject/ray:<version>-py311-...")
        if m.group("version") != ray.__version__:
            raise _fail(
                path,
                field,
                f"image {image!r} has Ray {m.group('version')}, "
                f"but the installed ray is {ray.__version__}",
            )
        if "py311" not in m.group("rest"):
            raise _fail(path, field, f"image {image!r} is not a py311 image")

    head_cmds = _commands(cfg, "head_start_ray_commands")
    worker_cmds = _commands(cfg, "worker_start_ray_commands")
    head_starts = _ray_start_commands(head_cmds)
    worker_starts = _ray_start_commands(worker_cmds)
    if not head_starts:
        raise _fail(path, "head_start_ray_commands", "no `ray start --head` command")
    if not worker_starts:
        raise _fail(path, "worker_start_ray_commands", "no `ray start --address` command")

    # The driver resource lives on the head and nowhere else.
    node_types = cfg.get("available_node_types") or {}
    head_type = cfg.get("head_node_type")
    head_resources = dict((node_types.get(head_type) or {}).get("resources") or {})
    for cmd in head_starts:
        head_resources.update(_resources_flag(cmd))
    if head_resources.get(DRIVER_RESOURCE, 0) < 1:
        raise _fail(
            path,
            f"available_node_types.{head_type}.resources" if head_type else "head_start_ray_commands",
            f"the head must advertise the custom resource {DRIVER_RESOURCE!r}",
        )
    for name, node_type in node_types.items():
        if name != head_type and DRIVER_RESOURCE in (node_type.get("resources") or {}):
            raise _fail(
                path,
                f"available_node_types.{name}.resources",
                f"worker types must not advertise {DRIVER_RESOURCE!r}",
            )
    for cmd in worker_starts:
        if DRIVER_RESOURCE in _resources_flag(cmd):
            raise _fail(
                path,
                "worker_start_ray_commands",
                f"workers must not advertise {DRIVER_RESOURCE!r}",
            )

    # GPU workers say so; a cloud cluster has GPU workers at all.
    gpu_types = 0
    for name, node_type in node_types.items():
        if name == head_type:
            continue
        gpus = (node_type.get("resources") or {}).get("GPU", 0)
        if _is_gpu_type(name, node_type):
            if gpus < 1:
                raise _fail(
                    path,
                    f"available_node_types.{name}.resources",
                    f"GPU worker type ({_instance_type(node_type) or name}) must declare GPU >= 1",
                )
            gpu_types += 1
    if provider != "local" and gpu_types == 0:
        raise _fail(path, "available_node_types", "no GPU worker type")

    # Dashboard and MLflow on loopback only.
    for cmd in head_starts:
        if "--head" not in cmd:
            continue
        host = _flag_value(cmd, "--dashboard-host")
        if host not in LOOPBACK_HOSTS:
            raise _fail(
                path,
                "head_start_ray_commands",
                f"`ray start --head` must pass --dashboard-host=127.0.0.1 (got {host!r})",
            )
    mlflow_cmds = [
        c
        for key in ("head_start_ray_commands", "head_setup_commands", "setup_commands")
        for c in _commands(cfg, key)
        if re.search(r"\bmlflow (server|ui)\b", c)
    ]
    if not mlflow_cmds:
        raise _fail(path, "head_start_ray_commands", "no MLflow server is started on the head")
    for cmd in mlflow_cmds:
        host = _flag_value(cmd, "--host") or _flag_value(cmd, "-h")
        if host not in LOOPBACK_HOSTS:
            raise _fail(
                path,
                "head_start_ray_commands",
                f"MLflow must bind --host 127.0.0.1 (got {host!r})",
            )

    # Token auth on every `ray start`, and the token shipped to every node.
    for key, cmds in (
        ("head_start_ray_commands", head_starts),
        ("worker_start_ray_commands", worker_starts),
    ):
        for cmd in cmds:
            if "RAY_AUTH_MODE=token" not in cmd and "RAY_AUTH_MODE=token" not in docker_env:
                raise _fail(path, key, "`ray start` must run with RAY_AUTH_MODE=token")
    mounts = cfg.get("file_mounts") or {}
    if not any(str(remote).rstrip("/").endswith(".ray/auth_token") for remote in mounts):
        raise _fail(
            path,
            "file_mounts",
            "the Ray auth token must be file-mounted to ~/.ray/auth_token (token auth)",
        )

    # Shared storage for Train/Tune results.
    env_text = " ".join(_commands(cfg, "setup_commands")) + " " + docker_env
    if "CLIPTD_STORAGE_PATH" not in env_text:
        raise _fail(path, "setup_commands", "CLIPTD_STORAGE_PATH (shared storage) is not set")


def validate_cluster_config(path: str | os.PathLike) -> dict:
    """Validate one `ray up` file offline; return the config as written.

    Raises ValueError("<file>: <field>: <what is wrong>") on the first problem.
    """
    import jsonschema

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise _fail(path, "<file>", f"cannot read: {e.strerror or e}") from None
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as e:
        msg = " ".join(str(e).split())
        raise _fail(path, "<yaml>", f"not valid YAML: {msg}") from None
    if not isinstance(cfg, dict):
        raise _fail(path, "<top level>", "a cluster config must be a mapping")

    try:
        jsonschema.validate(cfg, _ray_schema())
    except jsonschema.ValidationError as e:
        raise _schema_error(path, e) from None

    from ray.autoscaler._private.util import prepare_config, validate_config

    ray_logger = logging.getLogger("ray.autoscaler")
    level = ray_logger.level
    ray_logger.setLevel(logging.WARNING)  # prepare_config logs INFO lines about defaults
    try:
        prepared = prepare_config(copy.deepcopy(cfg))
        validate_config(prepared)
    except jsonschema.ValidationError as e:
        raise _schema_error(path, e) from None
    except BaseException as e:  # Ray aborts with click exceptions, asserts, KeyError...
        if isinstance(e, KeyboardInterrupt):
            raise
        msg = " ".join(str(getattr(e, "message", None) or e).split()) or type(e).__name__
        raise _fail(path, "<ray>", f"rejected by Ray's prepare/validate_config: {msg}") from None
    finally:
        ray_logger.setLevel(level)

    check_project_rules(cfg, path)
    return cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog("cliptd.clusters"), description="Check `ray up` files offline."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="validate cluster YAML files")
    v.add_argument("paths", nargs="+", help="cluster YAML files, e.g. clusters/gpu.yaml")
    args = parser.parse_args(argv)

    status = 0
    for p in args.paths:
        try:
            cfg = validate_cluster_config(p)
        except ValueError as e:
            print(f"INVALID {e}", file=sys.stderr)
            status = 1
            continue
        provider = cfg["provider"]
        if provider["type"] == "local":
            shape = f"head + {len(provider.get('worker_ips') or [])} worker ips"
        else:
            shape = f"{len(cfg.get('available_node_types') or {})} node types"
        print(f"OK {p} (provider {provider['type']}, {shape})")
    return status


if __name__ == "__main__":
    sys.exit(main())
