"""The README's configuration reference is kept in step with the pydantic models."""

import re
from pathlib import Path

from pydantic import BaseModel

from abproxy.config import Config, Experiment, Match, Price, UpstreamSettings, Variant

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
# A field holding a mapping of named entries documents its entries with a placeholder.
PLACEHOLDERS = {
    ("upstreams",): ("<name>", UpstreamSettings),
    ("prices",): ("<model>", Price),
    ("experiments",): ("<name>", Experiment),
    ("experiments", "<name>", "variants"): ("<v>", Variant),
    ("experiments", "<name>", "feedback"): ("<metric>", None),
}
INTERNAL = {"prompt_sources"}  # filled by abproxy, not written by users


def documented_keys() -> set[str]:
    section = README.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
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
            else:
                keys |= model_keys(inner, path + (label,))
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel) and annotation is not Match:
            keys |= model_keys(annotation, path)
        elif annotation is Match:
            keys |= {".".join(path + (sub,)) for sub in Match.model_fields}
        else:
            keys.add(".".join(path))
    return keys


def test_every_config_key_is_documented_and_every_documented_key_exists():
    expected = model_keys(Config)
    documented = documented_keys()
    assert not expected - documented, f"undocumented config keys: {sorted(expected - documented)}"
    assert not documented - expected, f"documented keys that do not exist: {sorted(documented - expected)}"
