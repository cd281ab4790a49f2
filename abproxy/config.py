"""Settings: pydantic models, YAML loading with ``${VAR}`` expansion, and error paths.

Every invalid value becomes a :class:`ConfigError` naming the dotted path of the bad key,
e.g. ``experiments.translation.variants.pro.weight: must be >= 0``.

Over 450 lines on purpose: the models are the configuration's one schema, read top to bottom in
the order of docs/reference.md's keys, each with its checks beside it; split, a key's rules would
sit apart from the keys they depend on.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from abproxy.tracking_uri import redact_credentials, tracking_uri_problem

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"
"""Experiment and variant names end up in Redis keys, MLflow names and Prometheus labels."""

BUILTIN_METRICS = (
    "error_rate",
    "latency_ms",
    "ttft_ms",
    "response_chars",
    "response_words",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost_usd",
)

DEFAULT_CONFIG_PATHS = ("config/abproxy.yaml", "abproxy.yaml")
CONFIG_ENV = "ABPROXY_CONFIG"


def _check_names(names: Iterable[str], kind: str) -> None:
    for name in names:
        if not re.match(NAME_PATTERN, name):
            raise ValueError(f"{kind} name {name!r} must match {NAME_PATTERN}")


class ConfigError(Exception):
    """An invalid configuration; ``str()`` is ``path: message`` lines, one per problem."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("\n".join(f"{path}: {message}" if path else message for path, message in problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MlflowSettings(_Strict):
    tracking_uri: str = "sqlite:///mlflow.db"
    flush_interval_s: float = Field(30.0, ge=0)
    trace_sample_rate: float = Field(0.05, ge=0, le=1)
    """Share of experiment requests written to MLflow as traces (0 turns tracing off)."""
    max_traces_per_minute: int = Field(600, ge=0)
    """Per replica: the sample is thinned past this, so MLflow's load stays bounded."""

    @field_validator("tracking_uri")
    @classmethod
    def _tracking_uri(cls, uri: str, info: ValidationInfo) -> str:
        environ = (info.context or {}).get("environ", os.environ)
        problem = tracking_uri_problem(uri, environ)
        if problem:
            raise ValueError(problem)
        return uri

    @property
    def shown_tracking_uri(self) -> str:
        """The tracking URI as it may be printed or stored: credentials in it (``user:password@``,
        or a token as the user name) replaced by ``***``."""
        return redact_credentials(self.tracking_uri)


class ServerSettings(_Strict):
    api_keys: list[str] = []
    admin_key: str = ""
    metrics_key: str = ""
    """``/metrics`` needs this or the admin key when either is set (else a client key, when
    ``api_keys`` is set): it publishes what ``/abproxy/*`` protects."""
    max_body_bytes: int = Field(10 * 1024 * 1024, gt=0)
    max_header_bytes: int = Field(64 * 1024, ge=1024)
    header_timeout_s: float = Field(10.0, gt=0)
    body_timeout_s: float = Field(30.0, gt=0)
    """A request body not fully received this long after its headers: 408, connection closed."""
    max_response_bytes: int = Field(64 * 1024 * 1024, gt=0)
    shutdown_grace_s: float = Field(120.0, ge=0)
    allow_open_relay: bool = False

    @field_validator("api_keys")
    @classmethod
    def _no_empty_keys(cls, keys: list[str]) -> list[str]:
        keys = [_one_line_key(key) for key in keys]
        if any(not key for key in keys):
            raise ValueError("must not contain an empty key")
        return keys

    @field_validator("admin_key", "metrics_key")
    @classmethod
    def _one_line(cls, key: str) -> str:
        return _one_line_key(key)


def _one_line_key(key: str) -> str:
    # A key read from a file or a Kubernetes secret often ends in a newline: harmless once
    # stripped (a client could never send it), but inside a header it would end the header block.
    key = key.strip()
    if any(character in key for character in "\r\n\0"):
        raise ValueError("must be one line")
    return key


class UpstreamSettings(_Strict):
    base_url: str
    api_key: str = ""
    timeout_s: float = Field(120.0, gt=0)
    max_connections: int = Field(512, ge=1)
    """Connections open to this upstream at once, per process: a slow upstream holds requests
    waiting for one of these (up to their timeout) rather than every socket the process has."""

    @field_validator("api_key")
    @classmethod
    def _one_line_key(cls, key: str) -> str:
        return _one_line_key(key)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not re.match(r"^https?://[^/\s]+", url):
            raise ValueError("must be an http:// or https:// URL")
        return url.rstrip("/")


class Price(_Strict):
    input: float = Field(ge=0)
    output: float = Field(ge=0)


class StatsSettings(_Strict):
    alpha: float = Field(0.05, gt=0, lt=1)
    min_samples: int = Field(30, ge=2)
    sequential: bool = True
    mde: float = Field(0.05, gt=0)
    """Minimal effect worth detecting, relative to the control's mean: drives ``no_difference``
    and the samples-still-needed estimate."""


class FeedbackMetric(_Strict):
    min: float
    max: float
    higher_is_better: bool = True
    """False for a score that should go down (a complaint count, a rating of effort)."""

    @model_validator(mode="after")
    def _ordered(self) -> FeedbackMetric:
        if self.max <= self.min:
            raise ValueError("max must be greater than min")
        return self


class Judge(_Strict):
    """An LLM judge that scores a sample of live answers (docs/reference.md, "LLM judges")."""

    model: str
    upstream: str | None = None
    prompt: str
    """A template with ``{{input}}`` (the client's last user message, before the variant applied)
    and ``{{output}}`` (the answer's text), or a Prompt Registry URI resolved at load."""
    min: float
    max: float
    sample_rate: float = Field(0.1, ge=0, le=1)
    max_per_minute: int = Field(60, ge=0)
    """Per replica, over any 60 s: past it the sample is thinned."""
    higher_is_better: bool = True
    timeout_s: float = Field(30.0, gt=0)
    """A judge call not answered this long after it was sent fails (``reason="timeout"``)."""
    prompt_source: str | None = Field(None, exclude=True)
    """Filled when the prompt loads from the Prompt Registry: its URI and version."""

    @model_validator(mode="after")
    def _valid(self) -> Judge:
        if self.max <= self.min:
            raise ValueError("max must be greater than min")
        if not self.prompt.startswith("prompts:/") and "{{output}}" not in self.prompt:
            raise _PathError(("prompt",), "must contain {{output}} (the answer judged), or be a prompts:/ URI")
        return self

    def version(self, default_upstream: str) -> str:
        """What makes two judges' scores comparable: model, upstream, prompt and range. An edited
        judge is a new version, whose scores are counted apart from the old one's."""
        definition = [self.model, self.upstream or default_upstream, self.prompt, self.min, self.max]
        return hashlib.sha256(json.dumps(definition, ensure_ascii=False).encode()).hexdigest()[:8]


class GuardrailMargin(_Strict):
    """How much worse than the control a winner may be on a guardrail metric: ``margin`` in the
    metric's own units (0.02 is two percentage points of a rate), or ``relative_margin`` × the
    control's mean; with neither, 1 percentage point for a rate, else 10% of the control's mean."""

    margin: float | None = Field(None, gt=0)
    relative_margin: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_of(self) -> GuardrailMargin:
        if self.margin is not None and self.relative_margin is not None:
            raise ValueError("give margin or relative_margin, not both")
        return self


class Match(_Strict):
    model: str | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str


class Variant(_Strict):
    control: bool = False
    weight: float = Field(1.0, ge=0)
    upstream: str | None = None
    model: str | None = None
    params: dict[str, Any] = {}
    system_prompt: str | None = None
    user_template: str | None = None
    messages: list[ChatMessage] | str | None = None
    """A chat template, or a Prompt Registry URI (``prompts:/name/3``) resolved at load."""
    prompt_sources: dict[str, str] = Field(default_factory=dict, exclude=True)
    """Filled when prompts load: prompt field → the Prompt Registry URI and version it came from."""

    @field_validator("messages")
    @classmethod
    def _messages_uri(cls, value: list[ChatMessage] | str | None) -> list[ChatMessage] | str | None:
        if isinstance(value, str) and not value.startswith("prompts:/"):
            raise ValueError("must be a list of {role, content} or a prompts:/ URI")
        return value

    @property
    def chat_template(self) -> list[ChatMessage] | None:
        """``messages`` as a template; a Prompt Registry URI must have been resolved first."""
        if isinstance(self.messages, str):
            raise ValueError(f"{self.messages} was not loaded from the Prompt Registry")
        return self.messages

    def definition_hash(self, default_upstream: str) -> str:
        """Hash of what changes the variant's behaviour (not its weight or control flag)."""
        definition = {
            "model": self.model,
            "upstream": self.upstream or default_upstream,
            "params": self.params,
            "system_prompt": self.system_prompt,
            "user_template": self.user_template,
            "messages": [m.model_dump() for m in self.messages] if isinstance(self.messages, list) else self.messages,
        }
        canonical = json.dumps(definition, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]


class Experiment(_Strict):
    match: Match = Match()
    unit: Literal["user", "request"] = "user"
    primary_metric: str | None = None
    feedback: dict[str, FeedbackMetric] = {}
    judges: dict[str, Judge] = {}
    """Written as a list of names of the top-level ``judges``; the config puts their settings here."""
    guardrails: dict[str, GuardrailMargin] = {}
    """Written as a list of metric names (default margins) or a mapping metric → margin;
    ``feedback`` is validated first, so the metric names can be checked here."""
    mlflow_experiment: str | None = None
    stop_on_harm: bool = True
    """A treatment whose always-valid interval shows harm beyond a guardrail's margin gets no new
    traffic (its units go to the control) until ``abproxy resume``."""
    variants: dict[str, Variant]

    @field_validator("variants")
    @classmethod
    def _variants(cls, variants: dict[str, Variant]) -> dict[str, Variant]:
        if len(variants) < 2:
            raise ValueError("an experiment needs at least two variants")
        _check_names(variants, "variant")
        if sum(1 for v in variants.values() if v.control) > 1:
            raise ValueError("exactly one variant may be the control")
        if not any(v.weight > 0 for v in variants.values()):
            raise ValueError("at least one variant needs a weight > 0")
        return variants

    @property
    def control_name(self) -> str:
        return next((name for name, v in self.variants.items() if v.control), next(iter(self.variants)))

    @property
    def metric_names(self) -> tuple[str, ...]:
        return (
            BUILTIN_METRICS
            + tuple(f"feedback.{name}" for name in self.feedback)
            + tuple(f"judge.{name}" for name in self.judges)
        )

    def scored(self, metric: str) -> FeedbackMetric | Judge | None:
        """The settings of a ``feedback.<name>`` or ``judge.<name>`` metric; None for the others."""
        kind, _, name = metric.partition(".")
        if kind == "feedback":
            return self.feedback.get(name)
        if kind == "judge":
            return self.judges.get(name)
        return None

    @property
    def primary(self) -> str:
        if self.primary_metric:
            return self.primary_metric
        return f"feedback.{next(iter(self.feedback))}" if self.feedback else "latency_ms"

    @field_validator("feedback")
    @classmethod
    def _feedback_names(cls, feedback: dict[str, FeedbackMetric]) -> dict[str, FeedbackMetric]:
        _check_names(feedback, "feedback")
        return feedback

    @field_validator("guardrails", mode="before")
    @classmethod
    def _guardrail_metrics(cls, value: Any, info: ValidationInfo) -> Any:
        listed = isinstance(value, list)
        if not listed and not isinstance(value, dict):
            raise _PathError((), "must be a list of metric names, or a mapping of metric to {margin: …} or {relative_margin: …}")
        known = (
            BUILTIN_METRICS
            + tuple(f"feedback.{name}" for name in info.data.get("feedback", {}))
            + tuple(f"judge.{name}" for name in info.data.get("judges", {}))
        )
        margins: dict[Any, Any] = {}
        for index, (metric, margin) in enumerate(((m, {}) for m in value) if listed else value.items()):
            where = (index,) if listed else (str(metric),)
            if not isinstance(metric, str):
                raise _PathError(where, "must be a metric name")
            if metric not in known:
                raise _PathError(where, f"unknown metric {metric!r}; one of {', '.join(known)}")
            if metric in margins:
                raise _PathError(where, f"{metric!r} is listed twice")
            if margin is not None and not isinstance(margin, dict):
                raise _PathError(where, "must be {margin: …} or {relative_margin: …} (or nothing, for the defaults)")
            margins[metric] = {} if margin is None else margin
        return margins

    @model_validator(mode="after")
    def _metrics_known(self) -> Experiment:
        known = self.metric_names
        if self.primary_metric is not None and self.primary_metric not in known:
            raise _PathError(("primary_metric",), f"unknown metric {self.primary_metric!r}; one of {', '.join(known)}")
        return self

    def higher_is_better(self, metric: str) -> bool:
        """Feedback and judges' scores go up unless declared otherwise; latency, tokens, cost and
        errors down."""
        scored = self.scored(metric)
        return scored.higher_is_better if scored is not None else False

    def is_rate(self, metric: str) -> bool:
        """A 0/1 metric: ``error_rate``, or feedback or a judge scored within [0, 1]."""
        if metric == "error_rate":
            return True
        scored = self.scored(metric)
        return scored is not None and (scored.min, scored.max) == (0, 1)


class Config(_Strict):
    redis_url: str = ""
    redis_allow_eviction: bool = False
    """Serve on a Redis whose ``maxmemory-policy`` may evict keys (counts may be lost or doubled)."""
    data_dir: Path = Path(".abproxy")
    feedback_ttl_s: int = Field(7 * 24 * 3600, gt=0)
    mlflow: MlflowSettings = MlflowSettings()
    server: ServerSettings = ServerSettings()
    upstreams: dict[str, UpstreamSettings] = {"openai": UpstreamSettings(base_url="https://api.openai.com/v1")}
    default_upstream: str = "openai"
    prices: dict[str, Price] = {}
    stats: StatsSettings = StatsSettings()
    judges: dict[str, Judge] = {}
    experiments: dict[str, Experiment] = {}

    @field_validator("judges")
    @classmethod
    def _judge_names(cls, judges: dict[str, Judge]) -> dict[str, Judge]:
        _check_names(judges, "judge")
        return judges

    @model_validator(mode="before")
    @classmethod
    def _judges_of_experiments(cls, data: Any) -> Any:
        """An experiment names its judges; it is given their settings (its metrics need them)."""
        if not isinstance(data, dict) or not isinstance(data.get("experiments"), dict):
            return data
        judges = data.get("judges")
        defined: dict[str, Any] = judges if isinstance(judges, dict) else {}
        experiments = {}
        for exp_name, experiment in data["experiments"].items():
            if isinstance(experiment, dict) and "judges" in experiment:
                names = experiment["judges"]
                where = ("experiments", str(exp_name), "judges")
                if names is None:
                    names = []
                if isinstance(names, dict):
                    names = list(names)  # a config written back from a loaded one (model_dump) names them as keys
                if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
                    raise _PathError(where, "must be a list of judge names (defined under the top-level judges:)")
                for index, name in enumerate(names):
                    if name not in defined:
                        known = ", ".join(defined) or "none is defined"
                        raise _PathError(where + (index,), f"unknown judge {name!r}; {known}")
                experiment = {**experiment, "judges": {name: _judge_or_stand_in(defined[name]) for name in names}}
            experiments[exp_name] = experiment
        return {**data, "experiments": experiments}

    @field_validator("experiments")
    @classmethod
    def _experiment_names(cls, experiments: dict[str, Experiment]) -> dict[str, Experiment]:
        _check_names(experiments, "experiment")
        return experiments

    @model_validator(mode="after")
    def _references(self) -> Config:
        if self.default_upstream not in self.upstreams:
            raise _PathError(("default_upstream",), f"unknown upstream {self.default_upstream!r}")
        for judge_name, judge in self.judges.items():
            if judge.upstream is not None and judge.upstream not in self.upstreams:
                raise _PathError(("judges", judge_name, "upstream"), f"unknown upstream {judge.upstream!r}")
        matched: dict[str, str] = {}
        for exp_name, experiment in self.experiments.items():
            model = experiment.match.model
            if model is not None:
                if model in matched:
                    raise _PathError(
                        ("experiments", exp_name, "match", "model"),
                        f"{model!r} is already matched by experiment {matched[model]!r}",
                    )
                matched[model] = exp_name
            for var_name, variant in experiment.variants.items():
                path = ("experiments", exp_name, "variants", var_name)
                if variant.upstream is not None and variant.upstream not in self.upstreams:
                    raise _PathError(path + ("upstream",), f"unknown upstream {variant.upstream!r}")
                if variant.model is None and model is not None:
                    raise _PathError(path + ("model",), "required when the experiment has match.model")
        return self


_STAND_IN_JUDGE = {"model": "-", "prompt": "{{output}}", "min": 0, "max": 1}


def _judge_or_stand_in(judge: Any) -> Any:
    """A judge's settings for an experiment's copy; an invalid judge's are replaced by a valid
    stand-in, so that its problems are reported once, at ``judges.<name>``, not again at each
    experiment (the config is refused either way)."""
    try:
        Judge.model_validate(judge)
    except (ValidationError, ValueError):
        return _STAND_IN_JUDGE
    return judge


class _PathError(ValueError):
    """Raised inside validators to point at a key deeper than the validated object."""

    def __init__(self, loc: tuple[str | int, ...], message: str):
        self.loc = loc
        self.message = message
        super().__init__(message)


_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(value: Any, environ: dict[str, str], path: tuple[str | int, ...] = ()) -> Any:
    """Expand ``${VAR}`` and ``${VAR:-default}`` in every string of a parsed YAML tree."""
    if isinstance(value, dict):
        return {key: expand_env(item, environ, path + (key,)) for key, item in value.items()}
    if isinstance(value, list):
        return [expand_env(item, environ, path + (index,)) for index, item in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in environ and (environ[name] != "" or default is None):
            return environ[name]
        if default is not None:
            return default
        raise ConfigError([(_dotted(path), f"environment variable {name} is not set (use ${{{name}:-default}})")])

    return _ENV_PATTERN.sub(substitute, value)


_MESSAGES = {
    "greater_than_equal": "must be >= {ge}",
    "greater_than": "must be > {gt}",
    "less_than_equal": "must be <= {le}",
    "less_than": "must be < {lt}",
    "extra_forbidden": "unknown key",
    "missing": "required",
}


def _dotted(loc: tuple[str | int, ...]) -> str:
    return ".".join(str(part) for part in loc)


def _problems(error: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for detail in error.errors():
        loc = tuple(detail["loc"])
        cause = (detail.get("ctx") or {}).get("error")
        if isinstance(cause, _PathError):
            problems.append((_dotted(loc + cause.loc), cause.message))
            continue
        template = _MESSAGES.get(detail["type"])
        ctx = {key: f"{value:g}" if isinstance(value, float) else value for key, value in detail.get("ctx", {}).items()}
        message = template.format(**ctx) if template else detail["msg"].removeprefix("Value error, ")
        problems.append((_dotted(loc), message))
    return problems


def parse_config(data: Any, environ: dict[str, str] | None = None) -> Config:
    """Validate an already-parsed YAML document."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([("", "the config file must be a YAML mapping")])
    env = dict(os.environ) if environ is None else environ
    expanded = expand_env(data, env)
    try:
        return Config.model_validate(expanded, context={"environ": env})
    except ValidationError as error:
        raise ConfigError(_problems(error)) from None


def _yaml_problem(error: yaml.YAMLError) -> str:
    """The parser's complaint and where, without the excerpt of the file that ``str(error)``
    quotes: the offending line may hold an API key, and this message ends up in logs."""
    if not isinstance(error, yaml.MarkedYAMLError):
        return str(error)
    problem = "; ".join(part for part in (error.context, error.problem) if part) or "syntax error"
    mark = error.problem_mark or error.context_mark
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


class ConfigNotFound(ConfigError):
    """No config file where one is looked for: never a silent run on the built-in defaults."""


def find_config_file(path: str | os.PathLike[str] | None, environ: Mapping[str, str]) -> Path:
    """``path``, else ``$ABPROXY_CONFIG``, else the first of :data:`DEFAULT_CONFIG_PATHS` (relative
    to the working directory) that exists."""
    if path:
        return Path(path)
    if environ.get(CONFIG_ENV):
        return Path(environ[CONFIG_ENV])
    found = next((Path(p) for p in DEFAULT_CONFIG_PATHS if Path(p).is_file()), None)
    if found is None:
        looked_at = " and ".join(DEFAULT_CONFIG_PATHS)
        message = (
            f"no config file: looked for {looked_at} in {Path.cwd()}; name one with --config FILE or "
            f"${CONFIG_ENV} (config/abproxy.yaml in abproxy's repository is a complete example)"
        )
        raise ConfigNotFound([("", message)])
    return found


def load_config(path: str | os.PathLike[str] | None = None, environ: dict[str, str] | None = None) -> Config:
    """Load ``path``, else ``$ABPROXY_CONFIG``, else ``config/abproxy.yaml``, else ``abproxy.yaml``;
    with none of them, :class:`ConfigNotFound` (:func:`parse_config` of ``{}`` gives the built-in
    defaults to a caller that wants them). Prompt Registry URIs stay as they are:
    :func:`abproxy.tracking.prompts.resolve_prompts` loads them, when the caller wants MLflow asked."""
    env = dict(os.environ) if environ is None else environ
    chosen = find_config_file(path, env)
    named_by = f" (named by ${CONFIG_ENV})" if not path and env.get(CONFIG_ENV) else ""
    try:
        text = chosen.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError([("", f"cannot read config file {chosen}{named_by}: {error.strerror}")]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError([("", f"{chosen} is not valid YAML: {_yaml_problem(error)}")]) from None
    return parse_config(data, env)
