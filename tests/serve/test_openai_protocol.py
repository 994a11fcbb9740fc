"""The OpenAI request bodies on their own: what they accept, what they refuse (the server answers 400), and
what they turn into."""

import pytest
from pydantic import ValidationError

from mimo.serve.openai_protocol import MAX_N, MAX_STOP, ChatCompletionRequest, CompletionRequest

USER = {"role": "user", "content": "hi"}


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [USER], **fields})


def test_a_minimal_chat_request_takes_the_defaults():
    r = chat()
    assert (r.model, r.max_tokens, r.temperature, r.n, r.stream, r.seed) == (None, None, None, 1, False, None)
    assert r.stop_list() == []


def test_numbers_are_strict_but_a_whole_float_counts_as_an_integer():
    assert chat(max_tokens=5.0).max_tokens == 5 and isinstance(chat(max_tokens=5.0).max_tokens, int)
    for bad in ({"max_tokens": 5.5}, {"max_tokens": "5"}, {"max_tokens": True}, {"temperature": "0.5"},
                {"stream": 1}, {"n": 0}, {"n": MAX_N + 1}, {"temperature": 2.5}, {"top_p": 0.0}, {"top_k": -2},
                {"max_tokens": 0}, {"seed": 2**64}):
        with pytest.raises(ValidationError):
            chat(**bad)
    assert chat(top_k=-1).top_k == -1 and chat(seed=-(2**63)).seed == -(2**63)


def test_stop_takes_a_string_or_up_to_four_and_drops_empty_ones():
    assert chat(stop="\n").stop_list() == ["\n"]
    assert chat(stop=["a", "", "b"]).stop_list() == ["a", "b"]
    with pytest.raises(ValidationError):
        chat(stop=["x"] * (MAX_STOP + 1))


def test_messages_by_role_with_text_parts_and_unknown_fields_ignored():
    r = ChatCompletionRequest.model_validate({"messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "two "}, {"type": "text", "text": "parts"}]},
        {"role": "assistant", "content": None, "tool_calls": []},
    ], "logit_bias": {"1": 2}})
    assert [m.role for m in r.messages] == ["developer", "user", "assistant"]
    assert [m.text() for m in r.messages] == ["be brief", "two parts", ""]
    for bad in ([], [{"role": "tool", "content": "x"}], [{"role": "user", "content": []}],
                [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]):
        with pytest.raises(ValidationError):
            ChatCompletionRequest.model_validate({"messages": bad})


def test_a_text_completion_prompt_is_text_texts_or_token_ids_and_defaults_to_16_tokens():
    assert CompletionRequest.model_validate({"prompt": "once"}).max_tokens == 16
    assert CompletionRequest.model_validate({"prompt": ["a", "b"]}).prompt == ["a", "b"]
    assert CompletionRequest.model_validate({"prompt": [1, 2, 3]}).prompt == [1, 2, 3]
    for bad in ("", [], [""], [-1], ["a"] * (MAX_N + 1)):
        with pytest.raises(ValidationError):
            CompletionRequest.model_validate({"prompt": bad})
