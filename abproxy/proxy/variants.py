"""Applying a variant to a request body: prompts, templates, model and params."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

import orjson

from abproxy.config import Variant

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


class TemplateError(ValueError):
    """A request cannot be rendered for its variant (a 400 for the client)."""


@functools.lru_cache(maxsize=1024)
def _parts(template: str) -> tuple[tuple[str, bool], ...]:
    """A template split once into (literal text, False) and (variable name, True) parts."""
    parts: list[tuple[str, bool]] = []
    position = 0
    for match in _PLACEHOLDER.finditer(template):
        if match.start() > position:
            parts.append((template[position : match.start()], False))
        parts.append((match.group(1), True))
        position = match.end()
    if position < len(template):
        parts.append((template[position:], False))
    return tuple(parts)


def _variable_text(name: str, value: Any) -> str:
    """A variable as the prompt shows it: a string as it is, any other JSON value as JSON (not as
    a Python repr, which also recurses too deep for a value nested a thousand levels)."""
    if isinstance(value, str):
        return value
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        raise TemplateError(f"the variable {name!r} in abproxy_variables is nested too deeply") from None


def render(template: str, input_text: str, variables: Mapping[str, Any]) -> str:
    pieces = []
    for text, is_variable in _parts(template):
        if not is_variable:
            pieces.append(text)
        elif text == "input":
            pieces.append(input_text)
        elif text in variables:
            pieces.append(_variable_text(text, variables[text]))
        else:
            raise TemplateError(
                f"the variant's template needs the variable {text!r}: send it in the request body's abproxy_variables"
            )
    return "".join(pieces)


def text_of(content: Any) -> str:
    """The text of a message content: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _with_text(content: Any, text: str, part_type: str) -> Any:
    """Replace the text of a message content, keeping its non-text parts (images, files)."""
    if not isinstance(content, list):
        return text
    others = [part for part in content if not (isinstance(part, dict) and isinstance(part.get("text"), str))]
    return [{"type": part_type, "text": text}, *others]


def _last_user_index(messages: list[Any]) -> int | None:
    for index in range(len(messages) - 1, -1, -1):
        message = messages[index]
        if isinstance(message, dict) and message.get("role") == "user":
            return index
    return None


def input_text(endpoint: str, body: dict[str, Any]) -> str:
    """The client's last user message as it sent it: what ``{{input}}`` stands for, in a
    variant's templates and in a judge's prompt (read before the variant is applied)."""
    if endpoint == "completions":
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            prompt = next((item for item in reversed(prompt) if isinstance(item, str)), "")
        return prompt if isinstance(prompt, str) else ""
    items = body.get("messages") if endpoint == "chat" else body.get("input")
    if isinstance(items, str) and endpoint == "responses":
        return items
    if not isinstance(items, list):
        return ""
    last_user = _last_user_index(items)
    return text_of(items[last_user].get("content")) if last_user is not None else ""


def pop_variables(body: dict[str, Any]) -> Mapping[str, Any]:
    variables = body.pop("abproxy_variables", None)
    if variables is None:
        return {}
    if not isinstance(variables, dict):
        raise TemplateError("abproxy_variables must be a JSON object")
    return variables


_RESPONSES_PARAM_NAMES = {"max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens"}


def _apply_model_and_params(body: dict[str, Any], variant: Variant, renamed: dict[str, str] | None = None) -> None:
    if variant.model is not None:
        body["model"] = variant.model
    if not renamed:
        body.update(variant.params)
        return
    for name, value in variant.params.items():
        target = renamed.get(name, name)
        if target != name and target in variant.params:
            continue  # the variant names the endpoint's own parameter too: that one wins
        body[target] = value


def _render_messages(
    variant: Variant, messages: list[Any], variables: Mapping[str, Any], part_type: str
) -> list[Any]:
    last_user = _last_user_index(messages)
    input_text = text_of(messages[last_user].get("content")) if last_user is not None else ""
    template = variant.chat_template
    if template is not None:
        return [{"role": m.role, "content": render(m.content, input_text, variables)} for m in template]
    rendered = list(messages)
    if variant.user_template is not None and last_user is not None:
        original = rendered[last_user]
        text = render(variant.user_template, input_text, variables)
        rendered[last_user] = {**original, "content": _with_text(original.get("content"), text, part_type)}
    if variant.system_prompt is not None:
        system = {"role": "system", "content": render(variant.system_prompt, input_text, variables)}
        rendered = [m for m in rendered if not (isinstance(m, dict) and m.get("role") in ("system", "developer"))]
        rendered.insert(0, system)
    return rendered


def apply_to_chat(body: dict[str, Any], variant: Variant, variables: Mapping[str, Any]) -> None:
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise TemplateError("'messages' must be a list")
    body["messages"] = _render_messages(variant, messages, variables, "text")
    _apply_model_and_params(body, variant)


def apply_to_responses(body: dict[str, Any], variant: Variant, variables: Mapping[str, Any]) -> None:
    """Responses API: ``instructions`` takes the system prompt, ``input`` the user template."""
    raw_input = body.get("input", "")
    messages = [{"role": "user", "content": raw_input}] if isinstance(raw_input, str) else raw_input
    if not isinstance(messages, list):
        raise TemplateError("'input' must be a string or a list")
    last_user = _last_user_index(messages)
    input_text = text_of(messages[last_user].get("content")) if last_user is not None else ""
    if variant.system_prompt is not None:
        body["instructions"] = render(variant.system_prompt, input_text, variables)
    template = variant.chat_template
    if template is not None:
        body["input"] = [{"role": m.role, "content": render(m.content, input_text, variables)} for m in template]
    elif variant.user_template is not None and last_user is not None:
        text = render(variant.user_template, input_text, variables)
        if isinstance(raw_input, str):
            body["input"] = text
        else:
            rendered = list(messages)
            original = rendered[last_user]
            rendered[last_user] = {**original, "content": _with_text(original.get("content"), text, "input_text")}
            body["input"] = rendered
    # A variant's chat parameters carry over: the Responses API calls max_tokens max_output_tokens.
    _apply_model_and_params(body, variant, _RESPONSES_PARAM_NAMES)


def apply_to_completions(body: dict[str, Any], variant: Variant, variables: Mapping[str, Any]) -> None:
    """Legacy completions: the prompt is one string, so the system prompt is prepended to it."""
    if variant.messages is not None:
        raise TemplateError("this variant is a chat 'messages' template; use /v1/chat/completions")
    prompt = body.get("prompt", "")
    if not isinstance(prompt, str):
        raise TemplateError("experiments apply to a single string 'prompt' only")
    text = render(variant.user_template, prompt, variables) if variant.user_template is not None else prompt
    if variant.system_prompt is not None:
        text = f"{render(variant.system_prompt, prompt, variables)}\n\n{text}"
    body["prompt"] = text
    _apply_model_and_params(body, variant)
