"""What a judge is shown and how its answer is read (abproxy.judging.prompt), and the rank
agreement between a judge and the users (abproxy.stats.agreement, against scipy): pure."""

from __future__ import annotations

import orjson
import pytest
from scipy import stats

from abproxy.config import Judge, Price
from abproxy.judging.prompt import MAX_JUDGED_CHARS, BadAnswer, cost_usd, read_answer, render, request_body
from abproxy.proxy.variants import input_text
from abproxy.recording.interpret import loads_or_none
from abproxy.stats.agreement import parse_pairs, rank_agreement

JUDGE = Judge(model="gpt-4o-mini", prompt="Q: {{input}}\nA: {{output}}", min=1, max=5)


def completion(content: object, usage: dict | None = None) -> object:
    """A chat completion's body as the judge's runner hands it on: parsed JSON."""
    body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}
    return loads_or_none(orjson.dumps({**body, **({"usage": usage} if usage else {})}))


def test_the_judge_sees_the_clients_last_user_message_on_every_endpoint() -> None:
    chat = {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "first"},
                         {"role": "assistant", "content": "ok"}, {"role": "user", "content": [{"type": "text", "text": "last"}]}]}  # fmt: skip
    assert input_text("chat", chat) == "last"
    assert input_text("completions", {"prompt": ["a", "b"]}) == "b"
    assert input_text("responses", {"input": "plain"}) == "plain"
    assert input_text("responses", {"input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}]}) == "hi"
    assert input_text("chat", {"messages": "not a list"}) == ""


def test_the_prompt_is_rendered_in_one_pass_and_bounded() -> None:
    rendered = render(JUDGE.prompt, "what is {{output}}?", "x" * (MAX_JUDGED_CHARS + 10))
    assert rendered.startswith("Q: what is {{output}}?\nA: x")  # the client's text is never re-rendered
    assert len(rendered) == len("Q: what is {{output}}?\nA: ") + MAX_JUDGED_CHARS
    body = orjson.loads(request_body(JUDGE, "prompt"))
    assert body == {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "prompt"}], "temperature": 0,
                    "response_format": {"type": "json_object"}}  # fmt: skip


def test_a_judges_answer_is_a_score_in_range_or_a_named_failure() -> None:
    assert read_answer(JUDGE, completion('{"score": 4, "rationale": "clear"}')).score == 4.0
    fenced = read_answer(JUDGE, completion('```json\n{"score": 2}\n```'))
    assert (fenced.score, fenced.rationale) == (2.0, None)
    failures = {
        "prose": (completion("Looks good to me!"), "bad_answer"),
        "no score": (completion('{"rating": 4}'), "bad_answer"),
        "a string": (completion('{"score": "4"}'), "bad_answer"),
        "a bool": (completion('{"score": true}'), "bad_answer"),
        "not finite": (completion('{"score": 1e999}'), "bad_answer"),
        "no text": (completion(None), "bad_answer"),
        "not a completion": (loads_or_none(b'{"error": "x"}'), "bad_answer"),
        "not JSON": (loads_or_none(b"<html>"), "bad_answer"),
        "too high": (completion('{"score": 6}'), "out_of_range"),
        "too low": (completion('{"score": 0.5}'), "out_of_range"),
    }
    for name, (body, reason) in failures.items():
        with pytest.raises(BadAnswer) as raised:
            read_answer(JUDGE, body)
        assert raised.value.reason == reason, name


def test_a_judge_calls_cost_is_priced_from_its_usage() -> None:
    body = completion('{"score": 3}', {"prompt_tokens": 700, "completion_tokens": 40})
    assert cost_usd(body, Price(input=0.15, output=0.60)) == pytest.approx((700 * 0.15 + 40 * 0.60) / 1e6)
    assert cost_usd(body, None) is None
    assert cost_usd(completion('{"score": 3}'), Price(input=1, output=1)) is None


def test_rank_agreement_is_spearmans_rho_with_ties_as_scipy_computes_it() -> None:
    judge = [1, 2, 2, 3, 4, 5, 5, 5, 3, 1]
    users = [2, 2, 3, 3, 5, 4, 5, 4, 2, 1]
    pairs: dict[str, str] = {}
    for j, u in zip(judge, users, strict=True):
        cell = f"{float(j)!r}|{float(u)!r}"
        pairs[cell] = str(int(pairs.get(cell, "0")) + 1)
    n, rho, p = rank_agreement(parse_pairs({**pairs, "garbage": "3", "1.0|2.0x": "1", "4.0|4.0": "0"}))
    expected = stats.spearmanr(judge, users)
    assert n == 10 and rho == pytest.approx(expected.statistic) and p == pytest.approx(expected.pvalue)
    assert rank_agreement({(1.0, 2.0): 2}) == (2, None, None), "too few to say anything"
    assert rank_agreement({(3.0, 1.0): 2, (3.0, 5.0): 4}) == (6, None, None), "a judge that gives one score ranks nothing"
