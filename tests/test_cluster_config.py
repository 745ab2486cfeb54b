"""The cluster launcher configs validate against Ray's own cluster-config schema, the way `ray up` checks them
(raw file against ray-schema.json, then Ray's defaults filled in and validated again)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def validate_cluster_config(config: dict) -> dict:
    """Raise jsonschema.ValidationError naming the offending field; return the config with Ray's defaults."""
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # before prepare_config, which needs a provider to fill defaults
    filled = prepare_config(copy.deepcopy(config))
    validate_config(filled)
    return filled


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-aws.yaml"])
def test_cluster_configs_validate_against_rays_schema(name):
    filled = validate_cluster_config(yaml.safe_load((REPO / name).read_text()))
    assert filled["head_node_type"] in filled["available_node_types"]


def test_aws_config_cpu_head_autoscaling_gpu_workers_dashboard_on_loopback():
    config = yaml.safe_load((REPO / "cluster-aws.yaml").read_text())
    filled = validate_cluster_config(config)
    assert filled["provider"]["type"] == "aws"
    head = filled["available_node_types"][filled["head_node_type"]]
    assert head["node_config"]["InstanceType"].startswith("m")  # CPU instance family
    (worker_type,) = [v for k, v in filled["available_node_types"].items() if k != filled["head_node_type"]]
    assert worker_type["min_workers"] == 0 and worker_type["max_workers"] >= 1
    assert worker_type["node_config"]["InstanceType"].startswith(("g", "p"))  # GPU instance family
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start
    setup = " ".join(config["setup_commands"] + config["head_setup_commands"])
    assert "make venv" in setup and "--artifacts-destination s3://" in setup


def test_a_config_without_provider_fails_with_a_clear_message():
    config = yaml.safe_load((REPO / "cluster-aws.yaml").read_text())
    del config["provider"]
    with pytest.raises(jsonschema.ValidationError, match="'provider' is a required property"):
        validate_cluster_config(config)
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config["min_workers"] = 2  # not a top-level key of Ray's schema (it belongs to a node type)
    with pytest.raises(jsonschema.ValidationError, match="'min_workers' was unexpected"):
        validate_cluster_config(config)
