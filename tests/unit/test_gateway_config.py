"""The gateway config the operator renders: defaults, round trip, and errors
that name the key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spotrag_operator import render
from spotrag_operator.crd import defaulted_spec
from spotrag_runtime.gateway.cli import build_parser, config_from_args
from spotrag_runtime.gateway.config import ConfigError, GatewayConfig, load_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

# The shape the operator renders (docs/gateway.md).
RENDERED = {
    "deployment": "demo",
    "namespace": "default",
    "servedModelName": "qwen2.5-7b",
    "engineModel": "Qwen/Qwen2.5-7B-Instruct",
    "maxModelLen": 8192,
    "retrieval": {
        "enabled": True,
        "embeddingModel": "intfloat/multilingual-e5-large",
        "queryPrefix": "query: ",
        "passagePrefix": "passage: ",
        "indexPath": "/var/lib/spotrag/index",
        "topK": 4,
        "scoreThreshold": 0.0,
        "device": "auto",
        "reloadIntervalSeconds": 10,
    },
    "prompt": {"system": "Be brief.", "template": "Refs:\n{contexts}\nQ: {question}", "contextTokenBudget": 3000},
    "engines": {"discovery": "endpointslices", "service": "demo-engines", "namespace": "default", "port": 8000},
    "admission": {
        "maxInflightTokensPerEngine": 65536,
        "maxInflightRequestsPerEngine": 256,
        "maxQueuedRequests": 1024,
        "queueTimeoutSeconds": 30,
        "maxTokensLimit": 4096,
        "defaultMaxTokens": 512,
        "prefixAffinity": True,
        "maxBodyBytes": 1048576,
    },
    "failover": {"maxAttempts": 3, "resumeStreams": True},
    "auth": {"apiKeysDir": "/etc/spotrag/api-keys"},
}


def test_the_rendered_shape_loads_with_every_value_kept() -> None:
    config = GatewayConfig.from_mapping(RENDERED)
    assert config.served_model_name == "qwen2.5-7b"
    assert config.retrieval.query_prefix == "query: "
    assert config.retrieval.reload_interval_seconds == 10.0
    assert config.engines.discovery == "endpointslices"
    assert config.engines.service == "demo-engines"
    assert config.admission.queue_timeout_seconds == 30.0
    assert config.auth.api_keys_dir == "/etc/spotrag/api-keys"
    # Rendering back gives every key the operator sent, with the same values.
    rendered_again = config.to_mapping()
    for section, values in RENDERED.items():
        if isinstance(values, dict):
            assert {key: rendered_again[section][key] for key in values} == values
        else:
            assert rendered_again[section] == values
    assert GatewayConfig.from_mapping(rendered_again) == config


def test_only_the_model_name_is_required() -> None:
    config = GatewayConfig.from_mapping({"servedModelName": "m"})
    assert config.retrieval.enabled and config.retrieval.top_k == 4
    assert config.prompt.template == "References:\n{contexts}\n\nQuestion: {question}"
    assert config.engines.discovery == "static" and config.engines.urls == ()
    assert config.admission.token_counting == "auto"
    assert config.auth.api_keys_dir is None


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({}, "servedModelName: required"),
        ([], "gateway config: must be an object, not list"),
        ({"servedModelName": "m", "retrieval": {"topk": 3}}, "retrieval.topk: unknown key (did you mean 'topK'?)"),
        ({"servedModelName": "m", "retreival": {}}, "retreival: unknown key (did you mean 'retrieval'?)"),
        ({"servedModelName": "m", "retrieval": {"topK": True}}, "retrieval.topK: must be an integer, not true"),
        ({"servedModelName": "m", "retrieval": {"topK": 0}}, "retrieval.topK: must be greater than 0, not 0"),
        ({"servedModelName": "m", "retrieval": "on"}, "retrieval: must be an object, not str"),
        ({"servedModelName": "m", "maxModelLen": "8k"}, 'maxModelLen: must be an integer, not "8k"'),
        ({"servedModelName": "m", "prompt": {"template": "{question}"}}, "prompt.template: must contain {contexts}"),
        (
            {"servedModelName": "m", "engines": {"discovery": "dns"}},
            "engines.discovery: must be 'static' or 'endpointslices', not 'dns'",
        ),
        (
            {"servedModelName": "m", "engines": {"discovery": "endpointslices"}},
            "engines.service: required when engines.discovery is 'endpointslices'",
        ),
        (
            {"servedModelName": "m", "engines": {"urls": ["127.0.0.1:8000"]}},
            "engines.urls: '127.0.0.1:8000' is not an http(s) URL",
        ),
        ({"servedModelName": "m", "engines": {"urls": "http://a:1"}}, "engines.urls: must be a list, not str"),
        (
            {"servedModelName": "m", "admission": {"defaultMaxTokens": 5000}},
            "admission.defaultMaxTokens (5000) is above admission.maxTokensLimit (4096)",
        ),
        (
            {"servedModelName": "m", "maxModelLen": 4096, "admission": {"maxTokensLimit": 4096}},
            "admission.maxTokensLimit (4096) leaves no room for a prompt in maxModelLen (4096)",
        ),
        ({"servedModelName": ""}, "servedModelName: must not be empty"),
    ],
)
def test_bad_configs_are_refused_naming_the_key(mapping: object, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        GatewayConfig.from_mapping(mapping)
    assert message in str(raised.value)


def test_token_limits_follow_the_context_length_unless_set() -> None:
    small = GatewayConfig.from_mapping({"servedModelName": "m", "maxModelLen": 2048})
    assert (small.max_tokens_limit, small.default_max_tokens) == (1024, 512)
    tiny = GatewayConfig.from_mapping({"servedModelName": "m", "maxModelLen": 512})
    assert (tiny.max_tokens_limit, tiny.default_max_tokens) == (256, 256)
    large = GatewayConfig.from_mapping({"servedModelName": "m", "maxModelLen": 131072})
    assert (large.max_tokens_limit, large.default_max_tokens) == (4096, 512)
    chosen = GatewayConfig.from_mapping(
        {"servedModelName": "m", "admission": {"maxTokensLimit": 100, "defaultMaxTokens": 50}}
    )
    assert (chosen.max_tokens_limit, chosen.default_max_tokens) == (100, 50)


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.yaml")), ids=lambda path: path.name)
def test_what_the_operator_renders_for_every_example_loads(example: Path) -> None:
    # The contract between the operator and the gateway: gateway.json as rendered.
    documents = [d for d in yaml.safe_load_all(example.read_text()) if d and d.get("kind") == "RAGDeployment"]
    assert documents, f"{example.name} holds no RAGDeployment"
    for body in documents:
        body["metadata"].setdefault("namespace", "default")
        body["metadata"]["uid"] = "0000-uid"  # as the API server would have set it
        rendered = json.loads(render.gateway_configmap(body, defaulted_spec(body))["data"]["gateway.json"])
        config = GatewayConfig.from_mapping(rendered)
        assert config.engines.discovery == "endpointslices" and config.engines.service
        assert config.max_tokens_limit < config.max_model_len


def test_load_config_reads_the_mounted_file_and_names_it_in_errors(tmp_path) -> None:
    path = tmp_path / "gateway.json"
    path.write_text(json.dumps(RENDERED))
    assert load_config(path) == GatewayConfig.from_mapping(RENDERED)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=f"{path}: not valid JSON"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read gateway config .*missing.json"):
        load_config(tmp_path / "missing.json")


def test_command_line_overrides_the_config(tmp_path) -> None:
    path = tmp_path / "gateway.json"
    path.write_text(json.dumps(RENDERED))
    args = build_parser().parse_args(
        [
            "--config",
            str(path),
            "--engine-url",
            "http://127.0.0.1:9001",
            "--engine-url",
            "http://127.0.0.1:9002",
            "--index",
            str(tmp_path / "index"),
        ]
    )
    config = config_from_args(args)
    assert config.engines.discovery == "static"
    assert config.engines.urls == ("http://127.0.0.1:9001", "http://127.0.0.1:9002")
    assert config.retrieval.index_path == str(tmp_path / "index")
    assert config.served_model_name == "qwen2.5-7b"
    with pytest.raises(ConfigError, match="give --config PATH, or at least --served-model-name"):
        config_from_args(build_parser().parse_args([]))


def test_the_gateway_cli_reports_a_bad_config_without_a_traceback(tmp_path) -> None:
    path = tmp_path / "gateway.json"
    path.write_text(json.dumps({"servedModelName": "m", "admission": {"maxQueuedRequest": 5}}))
    completed = subprocess.run(
        [sys.executable, "-m", "spotrag_runtime.gateway.cli", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 2
    assert "admission.maxQueuedRequest: unknown key (did you mean 'maxQueuedRequests'?)" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_the_config_imports_without_torch_or_fastapi() -> None:
    # The operator renders the config and its image has neither.
    code = (
        "import sys; from spotrag_runtime.gateway import GatewayConfig; "
        "GatewayConfig.from_mapping({'servedModelName': 'm'}); "
        "heavy = [m for m in ('torch', 'fastapi', 'faiss', 'sentence_transformers', 'httpx') if m in sys.modules]; "
        "print(heavy)"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert completed.stdout.strip() == "[]"
