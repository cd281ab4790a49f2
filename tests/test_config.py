import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from abproxy.config import ConfigError, load_config, parse_config, redact_credentials
from abproxy.simulation.scenario import raw_scenario

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "config" / "abproxy.yaml"


def _experiment(**variant_b: object) -> dict:
    return {
        "experiments": {
            "translation": {
                "match": {"model": "translation"},
                "variants": {"basic": {"model": "m"}, "pro": {"model": "m", **variant_b}},
            }
        }
    }


def _problem(data: dict, environ: dict | None = None) -> str:
    with pytest.raises(ConfigError) as raised:
        parse_config(data, environ or {})
    return str(raised.value)


def test_example_config_loads_with_the_seed_experiments():
    config = load_config(EXAMPLE, environ={})
    assert set(config.experiments["translation"].variants) == {"basic", "professional", "context_aware", "step_by_step"}
    assert set(config.experiments["sentiment"].variants) == {"simple", "detailed", "chain_of_thought"}
    assert config.redis_url == ""
    assert config.experiments["translation"].control_name == "basic"


def test_the_example_config_and_the_demo_run_one_seed_scenario():
    """One seed scenario (shipped in the package, run by the demo); the example config for real
    traffic carries its experiments and prices unchanged, so the two cannot drift apart."""
    example = load_config(EXAMPLE, environ={})
    seed = parse_config({"experiments": raw_scenario()["experiments"], "prices": raw_scenario()["prices"]}, environ={})
    assert example.experiments == seed.experiments
    assert example.prices == seed.prices


def test_env_expansion_uses_values_and_defaults():
    data = {"redis_url": "${R}", "mlflow": {"tracking_uri": "${T:-sqlite:///x.db}", "flush_interval_s": "${F:-12}"}}
    config = parse_config(data, {"R": "redis://h:1/0"})
    assert config.redis_url == "redis://h:1/0"
    assert config.mlflow.tracking_uri == "sqlite:///x.db"
    assert config.mlflow.flush_interval_s == 12
    assert parse_config({"redis_url": "${R:-fallback}"}, {"R": ""}).redis_url == "fallback"


def test_unset_variable_without_default_names_the_key():
    assert _problem({"server": {"admin_key": "${NOPE}"}}) .startswith("server.admin_key: environment variable NOPE")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (_experiment(weight=-1), "experiments.translation.variants.pro.weight: must be >= 0"),
        (_experiment(upstream="nowhere"), "experiments.translation.variants.pro.upstream: unknown upstream 'nowhere'"),
        (_experiment(colour="red"), "experiments.translation.variants.pro.colour: unknown key"),
        (_experiment(control=True) | {}, None),
        ({"stats": {"alpha": 1.5}}, "stats.alpha: must be < 1"),
        ({"server": {"max_body_bytes": 0}}, "server.max_body_bytes: must be > 0"),
        ({"upstreams": {"x": {"base_url": "ftp://a"}}, "default_upstream": "x"}, "upstreams.x.base_url: must be an http"),
        ({"default_upstream": "missing"}, "default_upstream: unknown upstream 'missing'"),
        ({"experiments": {"e": {"variants": {"only": {}}}}}, "experiments.e.variants: an experiment needs at least two"),
        ({"experiments": {"e": {"variants": {"a": {"weight": 0}, "b": {"weight": 0}}}}}, "experiments.e.variants: at least one"),
        (
            {"experiments": {"e": {"variants": {"a": {"control": True}, "b": {"control": True}}}}},
            "experiments.e.variants: exactly one variant may be the control",
        ),
        (
            {"experiments": {"e": {"primary_metric": "feedback.nope", "variants": {"a": {}, "b": {}}}}},
            "experiments.e.primary_metric: unknown metric 'feedback.nope'",
        ),
        (
            {"experiments": {"e": {"guardrails": ["error_rate", "speed"], "variants": {"a": {}, "b": {}}}}},
            "experiments.e.guardrails.1: unknown metric 'speed'",
        ),
        (
            {"experiments": {"e": {"guardrails": {"error_rate": {"margin": 0}}, "variants": {"a": {}, "b": {}}}}},
            "experiments.e.guardrails.error_rate.margin: must be > 0",
        ),
        (
            {"experiments": {"e": {"guardrails": {"latency_ms": {"relative_margin": -0.1}}, "variants": {"a": {}, "b": {}}}}},
            "experiments.e.guardrails.latency_ms.relative_margin: must be > 0",
        ),
        (
            {"experiments": {"e": {"guardrails": {"speed": {"margin": 1}}, "variants": {"a": {}, "b": {}}}}},
            "experiments.e.guardrails.speed: unknown metric 'speed'",
        ),
        (
            {"experiments": {"e": {"guardrails": {"error_rate": {"margin": 0.01, "relative_margin": 0.1}}, "variants": {"a": {}, "b": {}}}}},
            "experiments.e.guardrails.error_rate: give margin or relative_margin, not both",
        ),
        (
            {"experiments": {"e": {"guardrails": {"error_rate": {"margn": 0.01}}, "variants": {"a": {}, "b": {}}}}},
            "experiments.e.guardrails.error_rate.margn: unknown key",
        ),
        (
            {"experiments": {"e": {"guardrails": {"error_rate": 0.01}, "variants": {"a": {}, "b": {}}}}},
            "experiments.e.guardrails.error_rate: must be {margin: …} or {relative_margin: …}",
        ),
        (
            {"experiments": {"e": {"guardrails": "error_rate", "variants": {"a": {}, "b": {}}}}},
            "experiments.e.guardrails: must be a list of metric names, or a mapping",
        ),
        (
            {"experiments": {"e": {"guardrails": ["error_rate", "error_rate"], "variants": {"a": {}, "b": {}}}}},
            "experiments.e.guardrails.1: 'error_rate' is listed twice",
        ),
        (
            {"experiments": {"e": {"feedback": {"s": {"min": 5, "max": 1}}, "variants": {"a": {}, "b": {}}}}},
            "experiments.e.feedback.s: max must be greater than min",
        ),
        (
            {"experiments": {"e": {"feedback": {"s": {"min": 0, "max": 1, "higher_is_better": "sometimes"}}, "variants": {"a": {}, "b": {}}}}},
            "experiments.e.feedback.s.higher_is_better: Input should be a valid boolean",
        ),
        (
            {"experiments": {"e": {"match": {"model": "m"}, "variants": {"a": {}, "b": {"model": "x"}}}}},
            "experiments.e.variants.a.model: required when the experiment has match.model",
        ),
        (
            {
                "experiments": {
                    "e1": {"match": {"model": "m"}, "variants": {"a": {"model": "x"}, "b": {"model": "x"}}},
                    "e2": {"match": {"model": "m"}, "variants": {"a": {"model": "x"}, "b": {"model": "x"}}},
                }
            },
            "experiments.e2.match.model: 'm' is already matched by experiment 'e1'",
        ),
        ({"experiments": {"bad{name}": {"variants": {"a": {}, "b": {}}}}}, "experiments: experiment name 'bad{name}'"),
        (
            {"experiments": {"e": {"feedback": {"a|b": {"min": 0, "max": 1}}, "variants": {"a": {}, "b": {}}}}},
            "experiments.e.feedback: feedback name 'a|b' must match",
        ),
    ],
)
def test_invalid_values_name_the_dotted_path(data, expected):
    if expected is None:
        parse_config(data, {})
        return
    assert expected in _problem(data)


def test_guardrails_as_names_or_margins_and_feedback_direction():
    config = parse_config(
        {
            "experiments": {
                "e": {
                    "feedback": {"effort": {"min": 1, "max": 7, "higher_is_better": False}, "thumbs": {"min": 0, "max": 1}},
                    "guardrails": {"error_rate": {"margin": 0.02}, "latency_ms": {"relative_margin": 0.05}, "feedback.thumbs": None},
                    "variants": {"a": {}, "b": {}},
                },
                "f": {"guardrails": ["error_rate", "latency_ms"], "variants": {"a": {}, "b": {}}},
            }
        },
        {},
    )
    e, f = config.experiments["e"], config.experiments["f"]
    assert list(e.guardrails) == ["error_rate", "latency_ms", "feedback.thumbs"]
    assert e.guardrails["error_rate"].margin == 0.02 and e.guardrails["latency_ms"].relative_margin == 0.05
    assert e.guardrails["feedback.thumbs"].margin is None and e.guardrails["feedback.thumbs"].relative_margin is None
    assert list(f.guardrails) == ["error_rate", "latency_ms"]
    assert not e.higher_is_better("feedback.effort") and e.higher_is_better("feedback.thumbs")
    assert not e.higher_is_better("latency_ms") and not e.higher_is_better("error_rate")
    assert e.is_rate("error_rate") and e.is_rate("feedback.thumbs") and not e.is_rate("feedback.effort")


def test_check_config_cli_exits_2_with_the_path(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_experiment(weight=-1)))
    result = subprocess.run(
        [sys.executable, "-m", "abproxy", "check-config", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "experiments.translation.variants.pro.weight: must be >= 0" in result.stderr

    good = subprocess.run(
        [sys.executable, "-m", "abproxy", "check-config", str(EXAMPLE)], capture_output=True, text=True, timeout=60
    )
    assert good.returncode == 0, good.stderr
    assert "translation" in good.stdout


def test_unreadable_or_non_yaml_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml", environ={})
    broken = tmp_path / "broken.yaml"
    broken.write_text("experiments: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken, environ={})
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_config(listed, environ={})


def test_variant_hash_changes_with_prompt_model_and_params_but_not_weight():
    def arm_hash(**fields: object) -> str:
        config = parse_config(_experiment(**fields), {})
        return config.experiments["translation"].variants["pro"].definition_hash(config.default_upstream)

    base = arm_hash()
    assert arm_hash(weight=3) == base
    assert arm_hash(control=True) == base
    assert arm_hash(system_prompt="You are kind.") != base
    assert arm_hash(params={"temperature": 0.2}) != base
    assert arm_hash(model="other") != base


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
        ("http://mlflow:5000", "http://mlflow:5000"),
        ("postgresql://abproxy:pa55@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),
        ("https://dapi-token@example.cloud.databricks.com/x", "https://***@example.cloud.databricks.com/x"),
        ("databricks", "databricks"),
    ],
)
def test_tracking_uri_credentials_are_masked_wherever_it_is_shown(uri: str, shown: str) -> None:
    assert redact_credentials(uri) == shown


def test_an_upstream_key_with_a_trailing_newline_is_stripped_and_one_with_a_line_break_refused():
    upstream = {"base_url": "https://api.example.com/v1", "api_key": "${KEY}"}
    config = parse_config({"upstreams": {"up": upstream}, "default_upstream": "up"}, {"KEY": "sk-from-a-secret\n"})
    assert config.upstreams["up"].api_key == "sk-from-a-secret"
    problem = _problem({"upstreams": {"up": upstream}, "default_upstream": "up"}, {"KEY": "sk-a\r\nX-Injected: 1"})
    assert "upstreams.up.api_key" in problem and "one line" in problem
    assert "sk-a" not in problem  # the key itself is never echoed


def test_proxy_keys_from_secret_files_are_stripped_too():
    server = {"api_keys": ["${CLIENT}"], "admin_key": "${ADMIN}", "metrics_key": "${SCRAPE}"}
    environ = {"CLIENT": "sk-client\n", "ADMIN": " adm\n", "SCRAPE": "scrape\r\n"}
    config = parse_config({"server": server}, environ)
    assert (config.server.api_keys, config.server.admin_key, config.server.metrics_key) == (["sk-client"], "adm", "scrape")
    problem = _problem({"server": {"metrics_key": "${SCRAPE}"}}, {"SCRAPE": "a\nb"})
    assert "server.metrics_key" in problem and "one line" in problem
