"""envoy.yaml and its renderer: Envoy accepts the template and every rendering; bad input fails early."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.launcher.envoy_config import EnvoyTemplateError, render_envoy_config
from tests.fixtures.parts import DESCRIPTOR_SET, ENVOY_TEMPLATE, REPO_ROOT, envoy_argv


def validate(config: Path, cwd: Path) -> None:
    result = subprocess.run(
        envoy_argv(config, "--mode", "validate"),
        check=False,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, (
        f"envoy rejects {config}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )


def render(tmp_path: Path, **args: Any) -> Path:
    defaults: dict[str, Any] = {
        "http_port": 18080,
        "admin_port": 19901,
        "router_address": "127.0.0.1:50999",
        "descriptor_set": DESCRIPTOR_SET,
    }
    return render_envoy_config(ENVOY_TEMPLATE, tmp_path / "envoy.yaml", **{**defaults, **args})


def http_filter_names(config: dict[str, Any]) -> list[str]:
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return [http_filter["name"] for http_filter in hcm["http_filters"]]


def test_envoy_accepts_the_repository_template() -> None:
    validate(ENVOY_TEMPLATE, cwd=REPO_ROOT)


@pytest.mark.parametrize(
    "args",
    [
        {},
        {"api_keys": ["sk-one", "sk-two"]},
        {
            "api_keys": ["sk-one"],
            "max_request_bytes": 1024,
            "rate_limit_per_second": 0.5,
            "rate_limit_burst": 4,
        },
        {"rate_limit_per_second": 0, "stream_idle_timeout_s": 60, "access_log": False},
        {"router_address": "router.internal:50051", "listen_address": "127.0.0.1"},
        {"router_address": "[::1]:50051"},
    ],
    ids=["defaults", "keys", "keys-and-limits", "no-rate-limit", "dns-router", "ipv6-router"],
)
def test_envoy_accepts_rendered_configs(tmp_path: Path, args: dict[str, Any]) -> None:
    config = render(tmp_path, **args)
    # From another directory: every path in the rendered file is absolute.
    validate(config, cwd=tmp_path)


def test_rendering_sets_what_it_is_given(tmp_path: Path) -> None:
    config_path = render(
        tmp_path,
        http_port=0,
        admin_port=0,
        router_address="10.1.2.3:6000",
        api_keys=[" sk-a ", "sk-b", "sk-a", ""],
        max_request_bytes=4096,
        rate_limit_per_second=250,
        stream_idle_timeout_s=120.5,
    )
    assert stat.S_IMODE(config_path.stat().st_mode) == 0o600
    text = config_path.read_text()
    config = yaml.safe_load(text)
    assert config["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 0}
    names = http_filter_names(config)
    assert names.index("envoy.filters.http.api_key_auth") > names.index("envoy.filters.http.health_check")
    assert names.index("envoy.filters.http.api_key_auth") < names.index("envoy.filters.http.local_ratelimit")
    assert str(DESCRIPTOR_SET.resolve()) in text
    assert "sk-a" in text and text.count("sk-a") == 1
    assert "4096" in text and "120.5s" in text
    cluster = config["static_resources"]["clusters"][0]
    assert cluster["type"] == "STATIC"
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"] == {"address": "10.1.2.3", "port_value": 6000}
    # No YAML aliases: the rendered file is plain.
    assert "*id" not in text and "&id" not in text


def test_the_four_argument_call_keeps_the_template_defaults(tmp_path: Path) -> None:
    config = yaml.safe_load(render(tmp_path).read_text())
    template = yaml.safe_load(ENVOY_TEMPLATE.read_text())
    assert http_filter_names(config) == http_filter_names(template)
    assert "api_key_auth" not in str(config)


def test_zero_rate_removes_the_rate_limit(tmp_path: Path) -> None:
    config = yaml.safe_load(render(tmp_path, rate_limit_per_second=0).read_text())
    assert "envoy.filters.http.local_ratelimit" not in http_filter_names(config)


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ({"router_address": "nohost"}, ValueError),
        ({"router_address": "127.0.0.1:0"}, ValueError),
        ({"http_port": 70000}, ValueError),
        ({"api_keys": ["has space"]}, ValueError),
        ({"api_keys": "sk-one"}, TypeError),
        ({"max_request_bytes": 0}, ValueError),
        ({"descriptor_set": Path("/nonexistent/lmcluster.pb")}, FileNotFoundError),
    ],
)
def test_bad_arguments_fail_before_envoy_sees_them(
    tmp_path: Path, args: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        render(tmp_path, **args)


def test_an_api_key_never_appears_in_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as rejected:
        render(tmp_path, api_keys=["fine", "secret\nkey"])
    assert "secret" not in str(rejected.value)


def test_a_template_without_the_expected_parts_fails_loudly(tmp_path: Path) -> None:
    template = tmp_path / "template.yaml"
    config = yaml.safe_load(ENVOY_TEMPLATE.read_text())
    config["static_resources"]["clusters"][0]["name"] = "renamed"
    template.write_text(yaml.safe_dump(config))
    with pytest.raises(EnvoyTemplateError, match="router"):
        render_envoy_config(
            template,
            tmp_path / "out.yaml",
            http_port=1,
            admin_port=2,
            router_address="127.0.0.1:3",
            descriptor_set=DESCRIPTOR_SET,
        )
