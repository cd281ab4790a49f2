import os
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
    raw = raw_scenario()
    seed = parse_config({"experiments": raw["experiments"], "prices": raw["prices"], "judges": raw["judges"]}, environ={})
    # the judges alike but for their model (a real one, the simulated one) and how much they sample
    sampling = {"model", "sample_rate", "max_per_minute"}
    assert {name: judge.model_dump(exclude=sampling) for name, judge in example.judges.items()} == {
        name: judge.model_dump(exclude=sampling) for name, judge in seed.judges.items()
    }
    assert {name: (e.model_dump(exclude={"judges"}), list(e.judges)) for name, e in example.experiments.items()} == {
        name: (e.model_dump(exclude={"judges"}), list(e.judges)) for name, e in seed.experiments.items()
    }
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


# -- issue 18: no config file is an error, never a silent run with no experiments ----------------


def _cli(
    *args: str, cwd: Path, environ: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ABPROXY_", "MLFLOW_"))}
    return subprocess.run(
        [sys.executable, "-m", "abproxy", *args], cwd=cwd, env={**env, **(environ or {})},
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


# The fast lane runs two verbs; the slow one all of them (each is a process of its own).
@pytest.mark.parametrize(
    "verb",
    [
        pytest.param(("serve", "--port", "0"), id="serve"),
        pytest.param(("check-config",), id="check-config"),
        pytest.param(("report",), id="report", marks=pytest.mark.slow),
        pytest.param(("flush",), id="flush", marks=pytest.mark.slow),
        pytest.param(("promote", "translation"), id="promote", marks=pytest.mark.slow),
    ],
)
def test_a_verb_run_where_there_is_no_config_file_exits_2_naming_the_paths_it_looked_at(tmp_path, verb):
    result = _cli(*verb, cwd=tmp_path)
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    message = result.stderr
    for looked_at in ("config/abproxy.yaml", "abproxy.yaml", str(tmp_path), "$ABPROXY_CONFIG", "--config"):
        assert looked_at in message, message
    assert "Traceback" not in message and result.stdout == ""
    assert list(tmp_path.iterdir()) == []  # nothing started: no embedded Redis data, no MLflow store


@pytest.mark.slow
def test_a_config_file_named_by_the_environment_or_found_beside_the_user_is_used(tmp_path):
    missing = tmp_path / "elsewhere.yaml"
    named = _cli("check-config", cwd=tmp_path, environ={"ABPROXY_CONFIG": str(missing)})
    assert named.returncode == 2 and str(missing) in named.stderr and "ABPROXY_CONFIG" in named.stderr, named.stderr
    (tmp_path / "abproxy.yaml").write_text(yaml.safe_dump(_experiment()))
    found = _cli("check-config", cwd=tmp_path)
    assert found.returncode == 0, found.stderr
    assert "translation" in found.stdout


def test_load_config_without_a_file_refuses_and_the_worker_factory_with_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ABPROXY_CONFIG", raising=False)
    with pytest.raises(ConfigError) as raised:
        load_config(environ={})
    assert "config/abproxy.yaml" in str(raised.value) and str(tmp_path) in str(raised.value)
    # `serve --workers N` builds each worker's app this way: it must not serve no experiments.
    from abproxy.app import app_from_env

    with pytest.raises(ConfigError):
        app_from_env()
    assert parse_config({}, {}).experiments == {}  # built-in defaults stay available to library callers


# -- issue 18: a misspelt MLflow tracking URI is a config error ---------------------------------


def _tracking_problem(uri: str, environ: dict[str, str] | None = None) -> str:
    return _problem({"mlflow": {"tracking_uri": uri}}, environ)


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("sqlite//mlflow.db", "the colon is missing after 'sqlite': write sqlite:///mlflow.db"),
        ("sqlite///{tmp}/mlflow.db", "the colon is missing after 'sqlite': write sqlite:///{tmp}/mlflow.db"),
        ("http//mlflow:5000", "the colon is missing after 'http': write http://mlflow:5000"),
        ("mlflw://mlflow:5000", "unknown scheme 'mlflw'"),
        ("sqlte:///mlflow.db", "unknown scheme 'sqlte': did you mean sqlite:///mlflow.db?"),
        (
            "sqlite:////{tmp}/missing/dir/mlflow.db",
            "the folder {tmp}/missing/dir of the sqlite database does not exist",
        ),
        ("sqlite:///missing/mlflow.db", "the folder {tmp}/missing of the sqlite database does not exist"),
        ("sqlite:///{tmp}", "is a folder, not a database file"),
        ("sqlite://mlflow.db", "sqlite:///mlflow.db"),
        ("sqlite:mlflow.db", "sqlite:///mlflow.db"),
        ("http://", "names no host"),
        ("https://mlflow:50x0", "port"),
        ("postgresql:/db", "postgresql://"),
        ("postgresql+a+b://db/mlflow", "one +driver"),
        ("databricks-uc", "databricks"),
        ("", "must not be empty"),
        ("{tmp}/missing/mlruns", "the folder {tmp}/missing of MLflow's file store does not exist"),
        ("file://{tmp}/missing/mlruns", "the folder {tmp}/missing of MLflow's file store does not exist"),
        ("{tmp}/mlruns", "MLFLOW_ALLOW_FILE_STORE=true"),
    ],
)
def test_a_misspelt_tracking_uri_names_the_key_and_the_fix(tmp_path, monkeypatch, uri, expected):
    monkeypatch.chdir(tmp_path)
    environ = {} if "MLFLOW_ALLOW" in expected else {"MLFLOW_ALLOW_FILE_STORE": "true"}
    problem = _tracking_problem(uri.format(tmp=tmp_path), environ)
    assert problem.startswith("mlflow.tracking_uri: "), problem
    assert expected.format(tmp=tmp_path) in problem, problem
    assert [p.name for p in tmp_path.iterdir()] == []  # nothing was created on the way


def test_a_tracking_uri_error_never_shows_its_password():
    problem = _tracking_problem("postgresql:/abproxy:pa55word@db/mlflow")
    assert "mlflow.tracking_uri" in problem and "pa55word" not in problem, problem


@pytest.mark.parametrize(
    "uri",
    [
        "sqlite:///mlflow.db",
        "sqlite:///{tmp}/mlflow.db",
        "sqlite:////{tmp}/mlflow.db",
        "sqlite:///:memory:",
        "sqlite:///mlflow.db?timeout=20",
        "http://mlflow:5000",
        "http://127.0.0.1:5000/",
        "https://user:token@mlflow.example.com/prefix",
        "postgresql://abproxy:pw@db:5432/mlflow",
        "postgresql+psycopg2://db/mlflow",
        "mysql://db/mlflow",
        "mysql+pymysql://db/mlflow",
        "mssql+pyodbc://db/mlflow",
        "databricks",
        "databricks://my-profile",
        "file://{tmp}/mlruns",
        "{tmp}/mlruns",
        "mlruns",
    ],
)
def test_tracking_uris_mlflow_accepts_pass(tmp_path, monkeypatch, uri):
    monkeypatch.chdir(tmp_path)
    filled = uri.format(tmp=tmp_path)
    config = parse_config({"mlflow": {"tracking_uri": filled}}, {"MLFLOW_ALLOW_FILE_STORE": "true"})
    assert config.mlflow.tracking_uri == filled
    assert [p.name for p in tmp_path.iterdir()] == []


def test_a_tracking_store_plugins_scheme_passes(tmp_path, monkeypatch):
    """MLflow builds stores of the schemes installed packages declare (entry point group
    ``mlflow.tracking_store``): an installed plugin's scheme is no typo."""
    assert "unknown scheme 'acme-store'" in _tracking_problem("acme-store://bucket/mlflow")
    dist = tmp_path / "acme_mlflow_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-mlflow-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[mlflow.tracking_store]\nacme-store = acme_mlflow_plugin.store:AcmeStore\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = parse_config({"mlflow": {"tracking_uri": "acme-store://bucket/mlflow"}}, {})
    assert config.mlflow.tracking_uri == "acme-store://bucket/mlflow"


@pytest.mark.parametrize(
    "verb",
    [
        pytest.param(("check-config", "abproxy.yaml"), id="check-config"),
        pytest.param(("serve", "--config", "abproxy.yaml", "--port", "0"), id="serve", marks=pytest.mark.slow),
        pytest.param(("flush", "--config", "abproxy.yaml"), id="flush", marks=pytest.mark.slow),
    ],
)
def test_check_config_serve_and_flush_refuse_a_misspelt_tracking_uri_and_create_nothing(tmp_path, verb):
    work = tmp_path / "work"
    work.mkdir()
    data = {"data_dir": str(work / "data"), **_experiment()}
    for uri, fix in ((f"sqlite///{tmp_path}/mlflow.db", f"write sqlite:///{tmp_path}/mlflow.db"),
                     (f"sqlite:////{tmp_path}/missing/dir/mlflow.db", "does not exist")):  # fmt: skip
        (work / "abproxy.yaml").write_text(yaml.safe_dump({**data, "mlflow": {"tracking_uri": uri}}))
        result = _cli(*verb, cwd=work)
        assert result.returncode == 2, (result.returncode, result.stderr)
        assert "mlflow.tracking_uri: " in result.stderr and fix in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        assert sorted(p.name for p in tmp_path.rglob("*")) == ["abproxy.yaml", "work"]
