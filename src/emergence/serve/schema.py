"""The HTTP APIs' requests and responses as pydantic models: OpenAI's (completions, chat
completions, embeddings, models) and Ollama's (generate, chat, tags, show).

Requests are validated strictly (JSON types as the API documents them: "0.5" is not a number,
4.0 is not an integer, NaN is not a temperature), then turned into SamplingParams. Every
failure is an `ApiError(status, message, param)`, sent in OpenAI's error shape
{"error": {"message", "type", "param", "code"}} (Ollama's routes send {"error": message}).
Fields OpenAI defines that emergence does not implement are refused, never silently ignored;
vLLM's extra sampling fields (top_k, min_p, repetition_penalty, ignore_eos) are accepted, and
emergence's own: beam search (num_beams ...) and test-time search on chat completions
(`search`: SearchOptions, answered with a SearchResult beside the choices).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

from ..errors import EmergenceError
from ..generate import TokenLogprob
from ..sampling import SamplingParams
from ..search.strategies import NEEDS_VERIFIER, STRATEGIES
from ..tokenizer import Tokenizer

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")  # OpenAI's message roles
MAX_PROMPTS = 16  # prompts per completion request
MAX_CHOICES = 16  # n
MAX_SEARCH_N = 64  # search.n: samples (beams) of one test-time search
# compute_optimal is not served: it needs a table fitted on held-out problems (`emergence search --heldout`)
SEARCH_STRATEGIES = tuple(name for name in STRATEGIES if name != "compute_optimal")


class ApiError(HTTPException):
    """A request the server refuses (4xx) or could not serve (5xx), in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 close: bool = False) -> None:
        super().__init__(status_code=status, detail=message, headers={"Connection": "close"} if close else None)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                429: "rate_limit_error"}.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def validation_error(e: ValidationError | list[dict], prefix: tuple = ()) -> ApiError:
    """The first problem pydantic found, as a 400 naming the top-level field (OpenAI's `param`)."""
    errors = e.errors() if isinstance(e, ValidationError) else e
    first = errors[0]
    loc = [p for p in first.get("loc", ()) if p not in prefix]
    param = str(loc[0]) if loc and isinstance(loc[0], str) else None
    where = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(loc))
    if first.get("type") == "missing":
        return ApiError(400, f"'{where}' is required", param)
    if first.get("type") == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
    if first.get("type") in ("model_type", "model_attributes_type", "dict_type") and not loc:
        return ApiError(400, "the request body must be a JSON object")
    message = first["msg"].removeprefix("Value error, ")
    return ApiError(400, f"'{where}': {message}" if where else message, param)


def _check_text(value: Any) -> None:
    """Refuse lone UTF-16 surrogates ("\\ud800" escapes), which are not text, anywhere in a body."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("the request holds a lone UTF-16 surrogate escape (\\ud800-\\udfff)") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(k)
            _check_text(v)
    elif isinstance(value, list):
        for v in value:
            _check_text(v)


class Strict(BaseModel):
    """JSON types as documented; unknown fields are tolerated (clients send their own extras)."""

    model_config = ConfigDict(strict=True, extra="ignore")


class Request(Strict):
    """A request body: its strings must be text."""

    @model_validator(mode="before")
    @classmethod
    def _text(cls, data: Any) -> Any:
        _check_text(data)
        return data


# ------------------------------------------------------------------------------- OpenAI
Probability = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)]
StopStrings = str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=16)]


class StreamOptions(Strict):
    include_usage: bool = False


class SamplingFields(Request):
    """The fields completions and chat completions share."""

    model: str
    temperature: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] | None = None
    top_p: Probability | None = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopStrings | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]] | None = None
    seed: int | None = None
    user: str | None = None
    # vLLM's extra sampling fields
    top_k: Annotated[int, Field(ge=0)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=100, allow_inf_nan=False)] | None = None
    ignore_eos: bool = False
    # beam search (emergence's extra fields, transformers' meanings): n is the number of beams
    # returned, at most num_beams; the response comes whole (a stream sends it as one chunk)
    num_beams: Annotated[int, Field(ge=1, le=MAX_CHOICES, description=(
        "emergence extra: beam search with this many beams; `n` (at most num_beams) best beams are returned, "
        "each choice whole"))] | None = None
    length_penalty: Annotated[float, Field(ge=-10, le=10, allow_inf_nan=False, description=(
        "emergence extra, with num_beams: a beam's score is its log-probability / length ** length_penalty"))] | None = None
    early_stopping: bool | Literal["never"] | None = None
    no_repeat_ngram_size: Annotated[int, Field(ge=0, le=64)] | None = None

    @model_validator(mode="after")
    def _stop_text(self):
        if self.stop == "":
            raise ValueError("'stop' must be a non-empty string or a list of at most 16 of them")
        return self


class JsonSchemaFormat(Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs its 'json_schema' object")
        return self


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16  # OpenAI's default for completions
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    response_format: ResponseFormat | None = None  # as on chat completions (vLLM takes it here too)
    # test-time search is served on chat completions only (a completion continues its prompt verbatim; a search
    # puts a question into its own prompt format): refused here, never silently ignored
    search: SkipJsonSchema[Any] = None

    @field_validator("search")
    @classmethod
    def _no_search(cls, value: Any) -> Any:
        if value is not None:
            raise ValueError("test-time search is served on /v1/chat/completions (the last user message is the "
                             "question), not on /v1/completions")
        return value


class ContentPart(Strict):
    type: Literal["text"]
    text: str


class ToolCallFunction(Strict):
    name: str
    arguments: str


class ToolCall(Strict):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(Strict):
    role: str

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        if role not in CHAT_ROLES:
            raise ValueError(f"{role!r} is not a role ({', '.join(CHAT_ROLES)})")
        return role

    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _shape(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("a message needs its 'content' (only an assistant message with tool_calls may omit it)")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class FunctionDefinition(Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class SearchOptions(Strict):
    """emergence extra on chat completions: answer by test-time search (emergence.search) rather
    than one sample. The request's temperature, top_p, max_tokens (per solution) and seed apply."""

    model_config = ConfigDict(strict=True, extra="forbid")  # a misspelt option is an error, not a default
    strategy: str = Field(description="one of " + ", ".join(SEARCH_STRATEGIES),
                          json_schema_extra={"enum": list(SEARCH_STRATEGIES)})
    n: Annotated[int, Field(ge=1, le=MAX_SEARCH_N, description="N: whole solutions sampled, or beams")] = 4
    beam_width: Annotated[int, Field(ge=1, le=MAX_SEARCH_N, description=(
        "M: beam_search expands each of its N / M kept beams by M steps; dvts runs N / M subtrees of width M; "
        "n must be a multiple of it"))] = 4
    verifier: str | None = Field(None, description=(
        "the name of a verifier (reward model) the server loaded at start (`emergence serve --verifier NAME=DIR`); "
        "needed by " + ", ".join(sorted(NEEDS_VERIFIER)) + "; revisions picks by it when given, else by vote"))
    aggregation: Literal["last", "min", "prod"] = Field("last", description="a PRM's step scores -> one score")
    lookahead: Annotated[int, Field(ge=0, le=8, description="beam_search: greedy steps rolled out before scoring")] = 0
    step_tokens: Annotated[int, Field(ge=1, le=1024, description="step-wise search: tokens per step")] = 64
    max_steps: Annotated[int, Field(ge=1, le=64, description="step-wise search: rounds")] = 10
    window: Annotated[int, Field(ge=0, le=16, description="revisions: previous attempts kept in the prompt")] = 4
    budget: Annotated[int, Field(ge=0, le=MAX_SEARCH_N, description=(
        "self_correct: regenerations after the first sample (0: the sample as it is)"))] = 4
    threshold: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False, description=(
        "self_correct: a PRM step score below it rejects the step"))] = 0.5

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, name: str) -> str:
        if name == "compute_optimal":
            raise ValueError("compute_optimal is not served: it needs a table fitted on held-out problems "
                             "(`emergence search --heldout`); name the strategy it picks")
        if name not in SEARCH_STRATEGIES:
            raise ValueError(f"unknown search strategy {name!r} (use {', '.join(SEARCH_STRATEGIES)})")
        return name

    @model_validator(mode="after")
    def _consistent(self):
        if self.strategy in NEEDS_VERIFIER and self.verifier is None:
            raise ValueError(f"{self.strategy} needs a verifier: name one the server loaded in 'search.verifier'")
        if self.strategy in ("beam_search", "dvts") and self.n % self.beam_width:
            raise ValueError(f"{self.strategy} needs 'n' ({self.n}) to be a multiple of 'beam_width' "
                             f"({self.beam_width})")
        return self


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    search: SearchOptions | None = Field(None, description=(
        "emergence extra: answer by test-time search (best-of-N, beam search, ...) over the served model. The "
        "last user message is the question, put to the policy in emergence.search's prompt format; the reply is "
        "the chosen solution, `usage` counts every token the search generated, and the response's `search` "
        "object has the chosen answer and the FLOPs spent. Not with stream, n > 1, tools or logprobs."))


class EmbeddingRequest(Request):
    """POST /v1/embeddings."""

    model: str
    input: str | Annotated[list[str], Field(min_length=1, max_length=256)] | list[int] | \
        Annotated[list[list[int]], Field(min_length=1, max_length=256)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class Sampling:
    """What a request asks of the decoder, before the prompt's length is known."""

    def __init__(self, n: int, max_tokens: int | None, stream: bool, include_usage: bool, logprobs: int | None,
                 params: dict[str, Any]) -> None:
        self.n, self.max_tokens, self.stream, self.include_usage = n, max_tokens, stream, include_usage
        self.logprobs = logprobs  # top alternatives per token, None: no logprobs
        self.params = params  # SamplingParams fields except max_new_tokens and logprobs

    def for_prompt(self, prompt_tokens: int, context: int, index: int, prompt_param: str) -> SamplingParams:
        """SamplingParams for choice `index` of a prompt of prompt_tokens tokens."""
        if prompt_tokens >= context:
            raise ApiError(400, f"the prompt has {prompt_tokens} tokens; the model's context is {context}",
                           prompt_param, "context_length_exceeded")
        room = context - prompt_tokens
        max_tokens = room if self.max_tokens is None else self.max_tokens
        if max_tokens > room:
            raise ApiError(400, f"max_tokens {max_tokens} + {prompt_tokens} prompt tokens exceed the context of "
                           f"{context}", "max_tokens", "context_length_exceeded")
        params = dict(self.params)
        if params.get("seed") is not None:
            params["seed"] += index  # n > 1: different samples, reproducible
        try:
            return SamplingParams(max_new_tokens=max_tokens, logprobs=self.logprobs, **params)
        except EmergenceError as e:
            raise ApiError(400, str(e)) from None


# request field -> SamplingParams field, for the fields they share
_SAMPLING_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
                    "repetition_penalty": "repetition_penalty", "ignore_eos": "ignore_eos", "typical_p": "typical_p",
                    "num_beams": "num_beams", "length_penalty": "length_penalty", "early_stopping": "early_stopping",
                    "no_repeat_ngram_size": "no_repeat_ngram_size"}


def sampling(request: CompletionRequest | ChatCompletionRequest, defaults: dict[str, Any]) -> Sampling:
    """The request's sampling settings; `defaults` (SamplingParams fields, a store model's
    PARAMETERs) stand in for the fields the request leaves out."""
    given = request.model_fields_set
    params: dict[str, Any] = {k: v for k, v in defaults.items() if k not in ("max_new_tokens", "logprobs")}
    for name, field in _SAMPLING_FIELDS.items():
        if name in given and getattr(request, name, None) is not None:
            params[field] = getattr(request, name)
    if params.get("top_k", 0) < 0:
        params["top_k"] = 0
    if request.stop is not None:
        params["stop"] = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop)
    else:
        params["stop"] = tuple(params.get("stop", ()))
    if request.seed is not None:
        params["seed"] = request.seed % (1 << 63)
    if request.logit_bias:
        try:
            params["logit_bias"] = {int(k): v for k, v in request.logit_bias.items()}
        except ValueError:
            raise ApiError(400, "'logit_bias' keys must be token ids", "logit_bias") from None
    if isinstance(request, ChatCompletionRequest):
        if request.top_logprobs and not request.logprobs:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        max_tokens = request.max_tokens or request.max_completion_tokens
    else:
        if request.echo:
            raise ApiError(400, "'echo' is not supported: the prompt is not repeated in the completion", "echo")
        if request.suffix:
            raise ApiError(400, "'suffix' (text insertion) is not supported", "suffix")
        if request.best_of is not None and request.best_of != (request.n or 1):
            raise ApiError(400, "'best_of' is not supported (candidates are not ranked on the server); use n",
                           "best_of")
        logprobs = request.logprobs
        max_tokens = request.max_tokens
    if "max_tokens" not in given and "max_completion_tokens" not in given and "max_new_tokens" in defaults:
        max_tokens = defaults["max_new_tokens"]
    if params.get("num_beams", 1) > 1:  # the n choices are the best n beams of one search
        params["num_return_sequences"] = request.n or 1
    options = request.stream_options
    return Sampling(n=request.n or 1, max_tokens=max_tokens, stream=request.stream,
                    include_usage=bool(options and options.include_usage), logprobs=logprobs, params=params)


# ------------------------------------------------------------------------------- Ollama
class OllamaOptions(Strict):
    """Ollama's `options` (the Modelfile PARAMETER names); the ones emergence does not use
    (num_ctx, num_gpu, ...) are ignored, as Ollama ignores unknown ones."""

    model_config = ConfigDict(strict=False, extra="ignore")
    temperature: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    top_p: Probability | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    typical_p: Probability | None = None
    repeat_penalty: Annotated[float, Field(gt=0, le=100)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: int | None = None
    num_predict: int | None = None  # -1: until the context is full
    stop: list[Annotated[str, Field(min_length=1)]] | None = None

    def sampling(self, defaults: dict[str, Any]) -> dict[str, Any]:
        """SamplingParams fields: `defaults`, then these options."""
        out = dict(defaults)
        given = self.model_fields_set
        for name, field in (("temperature", "temperature"), ("top_k", "top_k"), ("top_p", "top_p"),
                            ("min_p", "min_p"), ("typical_p", "typical_p"), ("repeat_penalty", "repetition_penalty"),
                            ("presence_penalty", "presence_penalty"), ("frequency_penalty", "frequency_penalty"),
                            ("seed", "seed")):
            if name in given and getattr(self, name) is not None:
                out[field] = getattr(self, name)
        if self.stop is not None:
            out["stop"] = tuple(self.stop)
        if self.num_predict is not None:
            out["max_new_tokens"] = self.num_predict
        return out


class OllamaMessage(Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None

    @model_validator(mode="after")
    def _no_images(self):
        if self.images:
            raise ValueError("images are not supported: emergence's models read text")
        return self


class OllamaGenerate(Request):
    """POST /api/generate."""

    model: str
    prompt: str = ""
    system: str | None = None
    template: str | None = None
    raw: bool = False
    stream: bool = True
    context: list[int] | None = None
    options: OllamaOptions | None = None
    format: str | dict | None = None
    images: list[str] | None = None
    keep_alive: str | int | float | None = None


class OllamaChat(Request):
    """POST /api/chat."""

    model: str
    messages: list[OllamaMessage] = Field(default_factory=list)
    stream: bool = True
    options: OllamaOptions | None = None
    format: str | dict | None = None
    tools: list[Tool] | None = None
    keep_alive: str | int | float | None = None


class OllamaShow(Request):
    """POST /api/show."""

    model: str | None = None
    name: str | None = None  # the older field


# ------------------------------------------------------------------------------ responses
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict | None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: dict | None = None
    finish_reason: str


class SearchResult(BaseModel):
    """What a chat completion with `search` did (emergence.search.run's per-problem record)."""

    strategy: str
    n: int
    beam_width: int | None = None
    verifier: str | None = None
    answer: int | float | None = Field(None, description="the chosen solution's final answer (None: none found)")
    candidates: int = Field(description="the solutions (or finished beams) weighed")
    prompt_tokens: int = Field(description="tokens the policy prefilled (a prompt shared by its samples once)")
    generated_tokens: int
    verifier_tokens: int = Field(description="tokens the verifier read")
    policy_flops: float
    verifier_flops: float
    flops: float = Field(description="policy + verifier forward FLOPs (emergence.search.flops)")
    seed: int
    rounds: int | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    context: dict | None = Field(None, description="emergence: the messages dropped to fit the context window")
    search: SearchResult | None = Field(None, description="emergence: what a request's test-time search did")


class EmbeddingItem(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: dict


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached: int | None = None) -> dict:
    """OpenAI's usage object; `cached`: prompt tokens served from the prefix cache."""
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens}
    if cached is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    return out


def _piece(tokenizer: Tokenizer, token_id: int) -> str:
    """The text one token stands for ("▁the" -> " the": decoding a lone SentencePiece token
    drops its leading space, which OpenAI's token strings keep)."""
    text = tokenizer.decode([token_id], skip_special_tokens=False)
    if tokenizer.id_to_piece(token_id).startswith("\u2581") and not text.startswith(" "):
        text = " " + text
    return text


def chat_logprobs(tokenizer: Tokenizer, items: list[TokenLogprob]) -> dict:
    """OpenAI chat shape: {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}."""
    def entry(token_id: int, logprob: float) -> dict:
        text = _piece(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
    return {"content": [{**entry(i.token_id, i.logprob), "top_logprobs": [entry(t, lp) for t, lp in i.top]}
                        for i in items]}


def completion_logprobs(tokenizer: Tokenizer, items: list[TokenLogprob], offset: int = 0) -> dict:
    """OpenAI legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens = [_piece(tokenizer, i.token_id) for i in items]
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": [i.logprob for i in items],
            "top_logprobs": [{_piece(tokenizer, t): lp for t, lp in i.top} for i in items],
            "text_offset": offsets}


