import pytest

from abproxy.config import Variant
from abproxy.proxy.variants import (
    TemplateError,
    apply_to_chat,
    apply_to_completions,
    apply_to_responses,
    pop_variables,
    render,
)


def test_render_fills_input_and_variables_and_names_a_missing_one():
    assert render("Translate: {{input}} ({{ tone }})", "hi", {"tone": "formal"}) == "Translate: hi (formal)"
    with pytest.raises(TemplateError, match="'tone'"):
        render("{{tone}}", "hi", {})


def test_system_prompt_replaces_the_clients_system_message():
    body = {
        "model": "translation",
        "messages": [{"role": "system", "content": "old"}, {"role": "user", "content": "Hello"}],
        "temperature": 0.1,
        "top_p": 0.5,
    }
    variant = Variant(model="gpt-4o-mini", system_prompt="You translate.", params={"temperature": 0.7})
    apply_to_chat(body, variant, {})
    assert body["messages"] == [{"role": "system", "content": "You translate."}, {"role": "user", "content": "Hello"}]
    assert body["model"] == "gpt-4o-mini"
    assert body["temperature"] == 0.7 and body["top_p"] == 0.5


def test_system_prompt_is_inserted_first_when_there_is_none_and_template_hits_the_last_user_message():
    body = {
        "messages": [
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "second"},
        ]
    }
    apply_to_chat(body, Variant(system_prompt="S", user_template="T: {{input}}"), {})
    assert body["messages"] == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "T: second"},
    ]


def test_user_template_keeps_image_parts():
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}]}
    apply_to_chat(body, Variant(user_template="Q: {{input}}"), {})
    assert body["messages"][0]["content"] == [{"type": "text", "text": "Q: What is this?"}, image]


def test_messages_template_replaces_the_chat():
    variant = Variant(
        messages=[{"role": "system", "content": "Be {{tone}}."}, {"role": "user", "content": "Say: {{input}}"}]
    )
    body = {"messages": [{"role": "user", "content": "hi"}], "abproxy_variables": {"tone": "brief"}}
    apply_to_chat(body, variant, pop_variables(body))
    assert "abproxy_variables" not in body
    assert body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say: hi"}]


def test_responses_api_gets_instructions_and_rendered_input():
    body = {"model": "translation", "input": "Hello", "instructions": "old"}
    apply_to_responses(body, Variant(model="m", system_prompt="Translate.", user_template="EN: {{input}}"), {})
    assert body == {"model": "m", "input": "EN: Hello", "instructions": "Translate."}
    listed = {"input": [{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}]}
    apply_to_responses(listed, Variant(user_template="EN: {{input}}"), {})
    assert listed["input"][0]["content"] == [{"type": "input_text", "text": "EN: Hi"}]


def test_completions_prompt_is_rendered_with_the_system_prompt_first():
    body = {"prompt": "Hello"}
    apply_to_completions(body, Variant(system_prompt="Translate.", user_template="EN: {{input}}"), {})
    assert body["prompt"] == "Translate.\n\nEN: Hello"
    with pytest.raises(TemplateError):
        apply_to_completions({"prompt": "x"}, Variant(messages=[{"role": "user", "content": "{{input}}"}]), {})


def test_bad_shapes_are_template_errors():
    with pytest.raises(TemplateError):
        apply_to_chat({"messages": "not a list"}, Variant(), {})
    with pytest.raises(TemplateError):
        pop_variables({"abproxy_variables": ["x"]})
