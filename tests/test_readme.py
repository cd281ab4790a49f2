"""What the README and docs/ tell a user holds: the first experiment runs as written, the
configuration keys match the pydantic models, every link leads to a file in the repository, the
commands shown after the demo are the ones it prints, the README stays a few screens long, and
its word on requests HTTP cannot parse is what the proxy does."""

import re
import socket
from pathlib import Path

from pydantic import BaseModel

from abproxy.config import Config, Experiment, FeedbackMetric, Judge, Match, Price, UpstreamSettings, Variant
from abproxy.simulation.demo_folder import viewing_commands
from helpers import http_json

REPOSITORY = Path(__file__).resolve().parents[1]
README = (REPOSITORY / "README.md").read_text()
REFERENCE = (REPOSITORY / "docs" / "reference.md").read_text()
USER_DOCUMENTS = [REPOSITORY / "README.md", *sorted((REPOSITORY / "docs").glob("*.md"))]
# A field holding a mapping of named entries documents its entries with a placeholder.
PLACEHOLDERS = {
    ("upstreams",): ("<name>", UpstreamSettings),
    ("judges",): ("<name>", Judge),
    ("prices",): ("<model>", Price),
    ("experiments",): ("<name>", Experiment),
    ("experiments", "<name>", "variants"): ("<v>", Variant),
    ("experiments", "<name>", "feedback"): ("<metric>", FeedbackMetric),
}
# Fields documented together on their entry's own row (`feedback.<metric>`: `{min, max}`).
TOGETHER = {FeedbackMetric: {"min", "max"}}
INTERNAL = {"prompt_sources", "prompt_source"}  # filled by abproxy, not written by users


def documented_keys(document: str, heading: str) -> set[str]:
    section = document.split(heading, 1)[1].split("\n## ", 1)[0]
    keys = set()
    for cell in re.findall(r"^\| `([^`]+)` \|", section, re.M):
        keys.add(cell.replace("…variants.", "experiments.<name>.variants."))
    return keys


def model_keys(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> set[str]:
    keys = set()
    for name, field in model.model_fields.items():
        if name in INTERNAL:
            continue
        path = prefix + (name,)
        placeholder = PLACEHOLDERS.get(path)
        annotation = field.annotation
        if placeholder is not None:
            label, inner = placeholder
            if inner is None or inner is Price:
                keys.add(".".join(path + (label,)))
            elif inner in TOGETHER:
                keys.add(".".join(path + (label,)))
                keys |= {".".join(path + (label, name)) for name in inner.model_fields if name not in TOGETHER[inner]}
            else:
                keys |= model_keys(inner, path + (label,))
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel) and annotation is not Match:
            keys |= model_keys(annotation, path)
        elif annotation is Match:
            keys |= {".".join(path + (sub,)) for sub in Match.model_fields}
        else:
            keys.add(".".join(path))
    return keys


def test_the_reference_documents_every_config_key_and_no_other():
    expected = model_keys(Config)
    documented = documented_keys(REFERENCE, "### Keys")
    assert not expected - documented, f"keys missing from docs/reference.md: {sorted(expected - documented)}"
    assert not documented - expected, f"docs/reference.md documents keys that do not exist: {sorted(documented - expected)}"


# [text](target) and reference definitions `[label]: target`; code spans are not links.
INLINE_LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
REFERENCE_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.M)


def relative_links(document: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", document.read_text(), flags=re.S)
    targets = INLINE_LINK.findall(text) + REFERENCE_LINK.findall(text)
    return [target for target in targets if not re.match(r"^[a-z][a-z0-9+.-]*:|^#", target)]


def test_every_relative_link_in_readme_and_docs_leads_to_a_file_in_the_repository():
    broken = []
    for document in USER_DOCUMENTS:
        for target in relative_links(document):
            resolved = (document.parent / target.split("#", 1)[0]).resolve()
            if not resolved.exists() or not resolved.is_relative_to(REPOSITORY):
                broken.append(f"{document.relative_to(REPOSITORY)}: {target}")
    assert not broken, f"links to nothing a user has: {broken}"
    assert "docs/reference.md" in relative_links(REPOSITORY / "README.md")


def test_readme_and_docs_refer_to_nothing_outside_the_repository():
    for document in USER_DOCUMENTS:
        text = document.read_text()
        for outside in ("../shared", "SPEC.md", "/work/"):
            assert outside not in text, f"{document.relative_to(REPOSITORY)} mentions {outside}"


def test_readme_shows_the_commands_the_demo_prints_after_it():
    # The demo prints its folder's absolute path; the README writes the default folder under $PWD.
    printed = viewing_commands(Path("/PWD/.abproxy/demo"))
    assert printed in README.replace("$PWD", "/PWD")


def raw_exchange(url: str, request: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(request)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    return received


def test_a_request_http_cannot_parse_gets_uvicorns_plain_400_as_the_readme_says(served_proxy):
    answer = raw_exchange(served_proxy.url, b"NOT A REQUEST\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"content-type: text/plain" in head.lower()
    assert body == b"Invalid HTTP request received."
    assert "plain-text `400 Invalid HTTP request received.`" in README


def fenced(document: str, heading: str, language: str) -> list[str]:
    """The ``language`` code blocks of the section under ``heading``."""
    section = document.split(heading, 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", section, re.S)


def test_the_readme_is_a_few_screens_and_tells_no_history():
    lines = README.splitlines()
    assert len(lines) <= 400, f"README.md has {len(lines)} lines: move details into docs/"
    for history in ("used to", "before the rework", "we changed", "previous session", "now fixed"):
        assert history not in README, f"README.md tells history: {history!r}"


def test_the_readmes_first_experiment_runs_as_written(start_proxy, upstream_url):
    """The config, the SDK call and the feedback post of "Your first experiment", as written: only
    the upstream's base_url and the proxy's address are this test's."""
    import yaml

    from abproxy.config import parse_config

    (config_text,) = fenced(README, "## Your first experiment", "yaml")
    settings = yaml.safe_load(config_text)
    config = parse_config(settings, environ={})  # as `abproxy check-config` reads it, no key set
    assert list(config.experiments) == ["support"] and config.upstreams["openai"].api_key == ""
    settings["upstreams"]["openai"]["base_url"] = upstream_url
    proxy = start_proxy(parse_config(settings, environ={}), socket=True)

    (app_code,) = fenced(README, "## Your first experiment", "python")
    assert 'base_url="http://127.0.0.1:8080/v1"' in app_code
    namespace: dict = {}
    exec(app_code.replace("http://127.0.0.1:8080/v1", f"{proxy.url}/v1"), namespace)
    assert namespace["answer"]
    assert namespace["raw"].headers["X-ABProxy-Experiment"] == "support"
    variant = namespace["raw"].headers["X-ABProxy-Variant"]
    assert variant in {"plain", "expert"}
    proxy.settle()
    status, live = http_json("GET", f"{proxy.url}/abproxy/experiments/support")
    assert status == 200, live
    counted = next(v for v in live["variants"] if v["name"] == variant)
    assert counted["requests"] == 1 and counted["metrics"]["feedback.helpful"]["n"] == 1
