"""Request bodies of /v1/chat/completions and /v1/completions, validated with pydantic v2.

Unknown fields are ignored (OpenAI clients send some we do not use); a wrong type or value is
an `ApiError` 400 whose `param` names the field. Ranges follow OpenAI's where it has one.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ApiError

MAX_N = 16
MAX_TOP_LOGPROBS = 20
MAX_COUNT = 2**31 - 1  # token counts and ids travel as int32 / msgpack ints: larger values are refused here


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatMessage(BaseModel):
    """One OpenAI chat message; content is text, a list of content parts, or absent (tool calls)."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[dict[str, Any]], None] = None


class JsonSchemaFormat(BaseModel):
    """OpenAI's `response_format.json_schema`: a named JSON schema the output must match."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = Field(default="response", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None  # the output always matches the schema, strict or not


class ResponseFormatField(BaseModel):
    """OpenAI's `response_format`: free text, any JSON object, or JSON matching a schema."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema', and only with it")
        return self


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1)


class NamedToolChoice(BaseModel):
    """`{"type": "function", "function": {"name": ...}}`: the model must call that function."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: FunctionName


class SamplingFields(BaseModel):
    """Fields both routes share."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, gt=0, le=MAX_COUNT)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1, le=MAX_COUNT)  # -1 or 0: no top-k cut
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: Union[str, list[str], None] = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0, le=MAX_COUNT)
    return_token_ids: bool = False  # as vLLM: each choice also carries its generated token ids
    response_format: ResponseFormatField | None = None  # structured output (constrained decoding)

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("at most 4 non-empty stop strings")
        return stops

    @property
    def stop_strings(self) -> list[str]:
        return list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


VISION_BUDGETS = (70, 140, 280, 560, 1120)  # soft tokens per image Gemma 4 accepts


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, gt=0, le=MAX_COUNT)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool = True
    mm_processor_kwargs: dict[str, Any] | None = None  # {"max_soft_tokens": N}: this request's vision token budget

    @model_validator(mode="after")
    def _known_processor_kwargs(self):
        kwargs = self.mm_processor_kwargs or {}
        unknown = set(kwargs) - {"max_soft_tokens"}
        if unknown:
            raise ValueError(f"mm_processor_kwargs: unknown key {sorted(unknown)[0]!r}; supported: max_soft_tokens")
        budget = kwargs.get("max_soft_tokens")
        if budget is not None and (isinstance(budget, bool) or budget not in VISION_BUDGETS):
            raise ValueError(f"mm_processor_kwargs.max_soft_tokens must be one of {list(VISION_BUDGETS)}, got {budget!r}")
        return self

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        return self

    @model_validator(mode="after")
    def _tool_choice_needs_its_tool(self):
        if self.tool_choice in (None, "none", "auto"):
            return self
        if not self.tools:
            raise ValueError("tool_choice needs tools")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = {(t.get("function") or {}).get("name") for t in self.tools if isinstance(t, dict)}
            if self.tool_choice.function.name not in names:
                raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, which is not in tools")
        return self

    @property
    def tool_mode(self) -> str:
        """"none" (no tools, or tool_choice none: calls are not parsed), "auto", "required" or
        "function:NAME" (a named function)."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return f"function:{self.tool_choice.function.name}"
        return self.tool_choice or "auto"

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def top_count(self) -> int | None:
        """None: no logprobs; k: the chosen token's logprob and the top k alternatives."""
        return (self.top_logprobs or 0) if self.logprobs else None


Prompt = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(SamplingFields):
    prompt: Prompt
    max_tokens: int | None = Field(default=16, gt=0, le=MAX_COUNT)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value):
        if isinstance(value, str):
            return value
        if not value or any(isinstance(p, (str, list)) and len(p) == 0 for p in value):
            raise ValueError("the prompt must not be empty")
        if any(isinstance(t, int) and not 0 <= t <= MAX_COUNT for p in value for t in (p if isinstance(p, list) else [p])):
            raise ValueError(f"token ids must be in [0, {MAX_COUNT}]")
        return value

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts, one per entry (a batch of strings or of token id lists)."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(p, int) for p in self.prompt):
            return [list(self.prompt)]
        return list(self.prompt)

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens

    @property
    def top_count(self) -> int | None:
        return self.logprobs


def parse_body(model: type[BaseModel], body: Any) -> BaseModel:
    """Validate a decoded JSON body, or raise `ApiError(400)` naming the first bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if not _is_union_tag(p)) or None
        raise ApiError(400, f"{param or 'body'}: {first['msg']}", param=param) from None


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _is_union_tag(part) -> bool:
    """pydantic names the union member it tried in an error's location (`str`, `list[int]`)."""
    return isinstance(part, str) and ("[" in part or part in _TYPE_TAGS)
