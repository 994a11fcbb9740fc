"""The OpenAI API's request bodies as validated pydantic models (they also make the server's OpenAPI spec).

Strict types: a number sent as a string or a boolean as a number is refused (400); 5.5 tokens too, 5.0 is 5.
Fields mimo does not use are ignored, as OpenAI's own server ignores unknown ones.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

MAX_N = 16  # choices per request
MAX_STOP = 4  # stop sequences per request, as OpenAI


def _integral(v):
    """JSON Schema counts 5.0 as an integer; 5.5, "5" and true stay invalid."""
    return int(v) if isinstance(v, float) and v.is_integer() and abs(v) < 2**64 else v


def Int(**bounds):
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: str


Content = str | Annotated[list[TextPart], Field(min_length=1)]


class _Message(_Body):
    name: str | None = None

    def text(self) -> str:
        content = getattr(self, "content", None)
        if content is None:
            return ""
        return content if isinstance(content, str) else "".join(part.text for part in content)


class SystemMessage(_Message):
    role: Literal["system", "developer"]
    content: Content


class UserMessage(_Message):
    role: Literal["user"]
    content: Content


class AssistantMessage(_Message):
    role: Literal["assistant"]
    content: Content | None = None  # null with tool calls; its reasoning_content is not sent back to the model


ChatMessage = Annotated[SystemMessage | UserMessage | AssistantMessage, Field(discriminator="role")]


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingRequest(_Body):
    """What chat and text completions share."""
    model: str | None = Field(None, description="the served model's id (left out: the served model, as vLLM)")
    max_tokens: Int(ge=1) | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Int(ge=-1) | None = Field(None, description="mimo/vLLM extension; 0 or -1: off")
    n: Int(ge=1, le=MAX_N) = 1
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    seed: Int(ge=-(2**63), le=2**64 - 1) | None = None
    ignore_eos: bool = Field(False, description="vLLM extension: keep generating through end-of-turn tokens "
                             "until max_tokens (for fixed-length benchmarks)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return [s for s in stops if s]


class ChatCompletionRequest(SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Int(ge=1) | None = None


class CompletionRequest(SamplingRequest):
    prompt: (Annotated[str, Field(min_length=1)]
             | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=MAX_N)]
             | Annotated[list[Int(ge=0)], Field(min_length=1)])
    max_tokens: Int(ge=1) | None = 16  # OpenAI's default for text completions
    echo: bool = False
