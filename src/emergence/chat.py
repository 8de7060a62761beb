"""Chat templates and conversations: messages -> prompt text -> ids that fit the context.

    messages [{"role", "content"}] -> ChatTemplate.render -> prompt -> encode_prompt -> ids
                                      fit_context: drop or condense old turns until they fit

**Templates** are Jinja, as Hugging Face ships them, rendered the way transformers'
`apply_chat_template(..., tokenize=False)` renders them (the tests check it character for
character): `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension (`break`,
`continue`), `raise_exception(message)`, a `tojson` filter that does not HTML-escape,
`strftime_now(format)`, `namespace(...)`, `dict(...)`, the `{% generation %}` block (rendered
as its body), and the variables `messages`, `add_generation_prompt`, `tools`, `documents`, the
special tokens (`bos_token`, `eos_token`, ...) and any others the caller passes.

A template is untrusted code from a model download, so it runs in Jinja's
`ImmutableSandboxedEnvironment`: no attributes starting with "_" nor Python internals, no
mutation of the messages. Two things are stricter than transformers: touching an unsafe
attribute fails at once (transformers renders `{{ ''.__class__ }}` as an empty string and
only fails when the result is used), and repeating a string or list (`*`) or raising to a
power (`**`) is refused when the result would be huge. The sandbox does not bound time: a
template can still loop for long (Jinja caps each `range()` at 100,000 items).

Every failure, whether the template does not parse, refuses the conversation through
`raise_exception` (Llama 2 and Mistral check that roles alternate), hits the sandbox, or
breaks at render time, is an `InvalidArgument` with a one-line message naming the template.

**Where templates come from**: a Jinja string (`ChatTemplate(source)`), a
`tokenizer_config.json` whose "chat_template" is a string or a list of {"name", "template"}
(the one named "default" unless another is asked for), a Hugging Face folder
(`chat_template.jinja`, `chat_template.json` or `tokenizer_config.json`), GGUF metadata
("tokenizer.chat_template"), or a built-in by name: chatml, llama2, llama3, mistral, phi3,
vicuna (`BUILTIN_NAMES`).

**A model without a template** (a base model): `resolve_chat_template(found, missing=...)`
decides, and the caller has to choose. `missing="error"` (the default) raises an error that
names the built-ins; `missing="plain"` uses the plain-text transcript below (made for base
models, which only continue text); any built-in name uses that built-in.

    You are a helpful assistant.        <- system messages, as paragraphs

    User: Hello!
    Assistant: Hi there.
    User: What is 2+2?
    Assistant:                          <- add_generation_prompt; stop at "\\nUser:"

**Context**: `fit_context` renders the conversation, counts the prompt's tokens and, when
they do not leave `reserve` tokens for the reply in the context window, applies a policy:
"drop-oldest" drops whole turns (a user message with the replies that follow it), oldest
first, keeping the leading system messages and the latest turn; "condense" does the same and
leaves a short note ("[4 earlier messages omitted]") in the system prompt; "error" refuses.
The latest message is never cut: when it does not fit even with every older turn dropped,
the error says by how many tokens.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError, UndefinedError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import CheckpointError, InvalidArgument
from .tokenizer import Tokenizer

# ------------------------------------------------------------------ built-in templates
# The templates of the well-known chat formats, as mistral.rs ships them (MIT,
# EricLBuehler/mistral.rs chat_templates/*.json); the tests check them against those files.
_BUILTIN_SOURCES = {
    "chatml": (
        "{% for message in messages %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}"
        "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
        "{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if loop.index0 == 0 and system_message != false %}"
        "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}"
        "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    "llama3": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
        "+ message['content'] | trim + '<|eot_id|>' %}"
        "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
        "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
    ),
    "phi3": (
        "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') %}"
        "{{'<|user|>' + '\n' + message['content'] + '<|end|>' + '\n' + '<|assistant|>' + '\n'}}"
        "{% elif (message['role'] == 'assistant') %}{{message['content'] + '<|end|>' + '\n'}}{% endif %}{% endfor %}"
    ),
    "vicuna": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}"
        "{% else %}{% set loop_messages = messages %}"
        "{% set system_message = 'A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user\\'s questions.' %}{% endif %}"
        "{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if loop.index0 == 0 %}{{ system_message }}{% endif %}"
        "{% if message['role'] == 'user' %}{{ ' USER: ' + message['content'].strip() }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ASSISTANT: ' + message['content'].strip() + eos_token }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ ' ASSISTANT:' }}{% endif %}"
    ),
}

# name -> (special tokens the template reads, by default; strings that end an assistant turn
# besides EOS). A tokenizer's own special tokens replace these defaults (see fit_context).
_BUILTIN_TOKENS: dict[str, tuple[dict[str, str], tuple[str, ...]]] = {
    "chatml": ({}, ("<|im_end|>",)),
    "llama2": ({"bos_token": "<s>", "eos_token": "</s>"}, ()),
    "llama3": ({"bos_token": "<|begin_of_text|>"}, ("<|eot_id|>",)),
    "mistral": ({"bos_token": "<s>", "eos_token": "</s>"}, ()),
    "phi3": ({"bos_token": "<s>"}, ("<|end|>",)),
    "vicuna": ({"eos_token": "</s>"}, ()),
}
BUILTIN_NAMES: tuple[str, ...] = tuple(_BUILTIN_SOURCES)

# The fallback for models without a template (base models): a plain transcript.
PLAIN = "plain"
_PLAIN_SOURCE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% else %}{{ message['role'] | capitalize + ': ' + message['content'] + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
_PLAIN_STOP = ("\nUser:",)

# End-of-turn markers of well-known formats; a loaded template's `stop` lists those it contains.
_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")

# transformers' named special tokens (SPECIAL_TOKENS_ATTRIBUTES): template variables.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# GGUF metadata key -> template variable.
_GGUF_TOKEN_IDS = {"bos_token_id": "bos_token", "eos_token_id": "eos_token", "unknown_token_id": "unk_token",
                   "seperator_token_id": "sep_token", "padding_token_id": "pad_token"}
GGUF_TEMPLATE_KEY = "tokenizer.chat_template"

# ------------------------------------------------------------------ the sandbox
MAX_REPEAT = 1_000_000  # longest str / list a template may build with `*`
MAX_POWER_BITS = 1_000_000  # largest integer (in bits) a template may build with `**`


class _Refusal(TemplateError):
    """What `raise_exception(message)` raises: the template refuses the conversation."""


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, failing at the first unsafe attribute and refusing to build
    huge strings or integers (`'a' * 10**10`, `10 ** 10**7`)."""

    intercepted_binops = frozenset({"*", "**"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        # Jinja returns an Undefined that fails only when used; `{{ ''.__class__ }}` would render
        # as "". A template that reaches for internals is broken or hostile: stop it here.
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe")

    def call_binop(self, context: jinja2.runtime.Context, op: str, left: Any, right: Any) -> Any:
        if op == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(times, int) and len(seq) * times > MAX_REPEAT:
                    raise SecurityError(f"repeating a {type(seq).__name__} {times} times makes more than "
                                        f"{MAX_REPEAT} items")
        elif op == "**" and isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
            if left.bit_length() * right > MAX_POWER_BITS:
                raise SecurityError(f"{left} ** {right} is larger than {MAX_POWER_BITS} bits")
        return super().call_binop(context, op, left, right)


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers marks the assistant's text with it
    (for training masks); rendering a prompt only needs its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _body(caller: jinja2.runtime.Macro) -> str:
        return caller()


def _raise_exception(message: Any) -> None:
    raise _Refusal(str(message))


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | str | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; prompts want the JSON as it is.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _refuse_private(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise SecurityError(f"a namespace cannot hold the private name {name!r}")


class _Namespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses names starting with "_" (Jinja's accepts any)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - Jinja's signature: `self` may be a key
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _refuse_private(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _refuse_private(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


class _DictConstructor:
    """`dict(...)` and `dict.fromkeys(...)` without handing the `dict` type itself to templates."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, keys: Any, value: Any = None) -> dict:
        return dict.fromkeys(keys, value)


@functools.cache
def _environment() -> _Sandbox:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_Namespace,
                       dict=_DictConstructor())
    return env


@functools.lru_cache(maxsize=64)
def _compile(source: str) -> jinja2.Template:
    return _environment().from_string(source)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# ------------------------------------------------------------------ input data
def _plain(value: Any, where: str) -> Any:
    """A copy of `value` made of JSON types only (tuples kept), so that a template sees data,
    never the caller's objects and their methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise InvalidArgument(f"{where}: keys must be strings, got {type(k).__name__}")
            out[k] = _plain(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    for kind in (str, bool, int, float):  # subclasses (enums, numpy scalars) lose their methods
        if isinstance(value, kind):
            return kind(value)
    raise InvalidArgument(f"{where}: a chat template can only see JSON-like data, got {type(value).__name__}")


def _plain_messages(messages: Any) -> list[dict[str, Any]]:
    """Validated copies of `messages`: dicts with a non-empty "role" string; "content", when
    present, a string or a list of content blocks. Keys whose value is None are dropped, as
    transformers does (APIs send `"content": null` beside tool calls)."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise InvalidArgument(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    if not messages:
        raise InvalidArgument("the conversation is empty: give at least one message")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidArgument(f"message {i} must be a dict with 'role' and 'content', got {type(message).__name__}")
        message = _plain({k: v for k, v in message.items() if v is not None}, f"message {i}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise InvalidArgument(f"message {i} has no 'role' string")
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise InvalidArgument(f"message {i}: 'content' must be a string or a list of blocks, "
                                  f"got {type(content).__name__}")
        out.append(message)
    return out


# ------------------------------------------------------------------ ChatTemplate
@dataclass(frozen=True, eq=False)
class ChatTemplate:
    """A Jinja chat template with the defaults it renders with.

    source: the Jinja text. It is compiled (and its syntax checked) on construction.
    name: where it came from ("chatml", "tokenizer_config.json", "gguf", "custom"), for errors.
    special_tokens: default values of template variables such as `bos_token` / `eos_token`,
      from the same file as the template (or the built-in's usual tokens). `render` arguments
      replace them.
    stop: strings that end an assistant turn in this format besides the model's EOS token
      ("<|im_end|>" for ChatML, "\\nUser:" for the plain fallback); a hint for generation.
    """

    source: str
    name: str = "custom"
    special_tokens: Mapping[str, str] = field(default_factory=dict)
    stop: tuple[str, ...] = ()
    _compiled: jinja2.Template = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.source, str):
            raise InvalidArgument(f"a chat template must be a string, got {type(self.source).__name__}")
        for key, value in self.special_tokens.items():
            if not isinstance(value, str):
                raise InvalidArgument(f"chat template {self.name}: special token {key} must be a string")
        try:
            compiled = _compile(self.source)
        except TemplateSyntaxError as e:
            raise InvalidArgument(f"chat template {self.name} does not parse: line {e.lineno}: "
                                  f"{_one_line(e.message or '')}") from None
        except TemplateError as e:  # e.g. an unknown extension tag
            raise InvalidArgument(f"chat template {self.name} does not compile: {_one_line(str(e))}") from None
        object.__setattr__(self, "special_tokens", dict(self.special_tokens))
        object.__setattr__(self, "_compiled", compiled)

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False,
               **variables: Any) -> str:
        """The prompt text of `messages` ([{"role": ..., "content": ...}, ...]).

        add_generation_prompt: end with the header of an assistant reply, for the model to write.
        variables: more template variables (`bos_token="<s>"`, `enable_thinking=False`, ...);
          they replace `special_tokens`. `tools` and `documents` default to None.
        Message contents are data: "{{ 7*7 }}" in a message stays "{{ 7*7 }}".
        Raises InvalidArgument (one line) for bad messages and for every template failure.
        """
        return self._render(messages, add_generation_prompt, variables)

    def _render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool,
                variables: Mapping[str, Any], *, refusal_passes: bool = False) -> str:
        """`render`; with `refusal_passes`, a `raise_exception` in the template escapes as `_Refusal`."""
        msgs = _plain_messages(messages)
        context = {"tools": None, "documents": None, **self.special_tokens, **_plain(dict(variables), "variables")}
        try:
            return self._compiled.render(messages=msgs, add_generation_prompt=bool(add_generation_prompt), **context)
        except _Refusal as e:
            if refusal_passes:
                raise
            raise InvalidArgument(f"chat template {self.name} refused the conversation: "
                                  f"{_one_line(e.message or '')}") from None
        except SecurityError as e:
            raise InvalidArgument(f"chat template {self.name} was stopped by the sandbox: "
                                  f"{_one_line(str(e))}") from None
        except UndefinedError as e:
            raise InvalidArgument(f"chat template {self.name}: {_one_line(str(e))} (a missing message field "
                                  "or template variable, e.g. bos_token)") from None
        except Exception as e:  # a template is code: any error in it is a problem with the input
            raise InvalidArgument(f"chat template {self.name} failed: {type(e).__name__}: "
                                  f"{_one_line(str(e))}") from None

    # -- sources ------------------------------------------------------------------------

    @classmethod
    def builtin(cls, name: str) -> ChatTemplate:
        """A built-in template by name (`BUILTIN_NAMES`, or "plain" for the base-model fallback)."""
        if name == PLAIN:
            return cls(_PLAIN_SOURCE, name=PLAIN, stop=_PLAIN_STOP)
        if name not in _BUILTIN_SOURCES:
            raise InvalidArgument(f"unknown chat template {name!r} (built-ins: {', '.join(BUILTIN_NAMES)}, "
                                  f"or {PLAIN!r} for a base model)")
        tokens, stop = _BUILTIN_TOKENS[name]
        return cls(_BUILTIN_SOURCES[name], name=name, special_tokens=tokens, stop=stop)

    @classmethod
    def from_tokenizer_config(cls, config: Mapping[str, Any] | str | os.PathLike, *,
                              name: str | None = None) -> ChatTemplate | None:
        """The template of a `tokenizer_config.json` (a path, or its parsed dict), or None if it
        has none. "chat_template" is a string, or a list of {"name", "template"} from which
        `name` (default "default") is taken. The file's special tokens become the defaults.
        """
        label = "tokenizer_config.json"
        if not isinstance(config, Mapping):
            label = str(config)
            config = _read_json_object(Path(config))
        template = config.get("chat_template")
        if template is None:
            return None
        source, chosen = _pick_template(template, name, label)
        return cls(source, name=label if chosen is None else f"{label}:{chosen}",
                   special_tokens=_config_tokens(config, label), stop=_markers_in(source))

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, *, name: str | None = None) -> ChatTemplate | None:
        """The template of a Hugging Face model or tokenizer folder, or None if it has none:
        `chat_template.jinja` (where recent transformers saves it), else `chat_template.json`,
        else `tokenizer_config.json`; `name` picks a named one from the JSON files. Special
        tokens come from `tokenizer_config.json`."""
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"not a folder: {folder}")
        config_path = folder / "tokenizer_config.json"
        config = _read_json_object(config_path) if config_path.is_file() else {}
        tokens = _config_tokens(config, str(config_path))
        jinja_path, json_path = folder / "chat_template.jinja", folder / "chat_template.json"
        if jinja_path.is_file() and name is None:
            try:
                source = jinja_path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise CheckpointError(f"cannot read {jinja_path}: {_one_line(str(e))}") from None
            return cls(source, name=str(jinja_path), special_tokens=tokens, stop=_markers_in(source))
        for path, holder in ((json_path, None), (config_path, config)):
            if path.is_file():
                holder = _read_json_object(path) if holder is None else holder
                if holder.get("chat_template") is not None:
                    source, chosen = _pick_template(holder["chat_template"], name, str(path))
                    label = str(path) if chosen is None else f"{path}:{chosen}"
                    return cls(source, name=label, special_tokens=tokens, stop=_markers_in(source))
        if name is not None and jinja_path.is_file():
            raise InvalidArgument(f"{folder} has a single chat template ({jinja_path.name}), not one named {name!r}")
        return None

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any], *, name: str | None = None) -> ChatTemplate | None:
        """The template in GGUF metadata ("tokenizer.chat_template", or "tokenizer.chat_template.<name>"
        for a named one), or None if there is none. Special tokens are looked up from
        "tokenizer.ggml.*_token_id" in "tokenizer.ggml.tokens"."""
        key = GGUF_TEMPLATE_KEY if name is None else f"{GGUF_TEMPLATE_KEY}.{name}"
        source = metadata.get(key)
        if source is None:
            if name is not None:
                names = metadata.get("tokenizer.chat_templates") or []
                raise InvalidArgument(f"GGUF metadata has no chat template named {name!r} "
                                      f"(named ones: {', '.join(map(str, names)) or 'none'})")
            return None
        if not isinstance(source, str):
            raise CheckpointError(f"GGUF metadata {key} must be a string, got {type(source).__name__}")
        tokens = {}
        vocab = metadata.get("tokenizer.ggml.tokens")
        for id_key, variable in _GGUF_TOKEN_IDS.items():
            token_id = metadata.get(f"tokenizer.ggml.{id_key}")
            if isinstance(vocab, list) and isinstance(token_id, int) and 0 <= token_id < len(vocab) \
                    and isinstance(vocab[token_id], str):
                tokens[variable] = vocab[token_id]
        return cls(source, name=f"gguf {key}", special_tokens=tokens, stop=_markers_in(source))


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {_one_line(str(e))}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return value


def _pick_template(template: Any, name: str | None, label: str) -> tuple[str, str | None]:
    """(source, chosen name or None) from a "chat_template" value: a string, a list of
    {"name", "template"} or (transformers' in-memory form) a dict name -> template."""
    if isinstance(template, str):
        if name is not None and name != "default":
            raise InvalidArgument(f"{label} has a single chat template, not one named {name!r}")
        return template, None
    if isinstance(template, list):
        named = {}
        for item in template:
            if not (isinstance(item, Mapping) and isinstance(item.get("name"), str)
                    and isinstance(item.get("template"), str)):
                raise CheckpointError(f"{label}: chat_template list items must be {{'name', 'template'}} strings")
            named[item["name"]] = item["template"]
    elif isinstance(template, Mapping) and all(isinstance(v, str) for v in template.values()):
        named = dict(template)
    else:
        raise CheckpointError(f"{label}: chat_template must be a string or a list of named templates, "
                              f"got {type(template).__name__}")
    wanted = name or "default"
    if wanted not in named:
        raise InvalidArgument(f"{label} has no chat template named {wanted!r} "
                              f"(it has: {', '.join(sorted(named)) or 'none'}); pass name=")
    return named[wanted], wanted


def _config_tokens(config: Mapping[str, Any], label: str) -> dict[str, str]:
    """Named special tokens of a tokenizer_config.json: strings or {"content": ...} objects."""
    tokens = {}
    for key in SPECIAL_TOKEN_NAMES:
        value = config.get(key)
        if isinstance(value, Mapping):
            value = value.get("content")
        if value is None:
            continue
        if not isinstance(value, str):
            raise CheckpointError(f"{label}: {key} must be a string or an object with 'content'")
        tokens[key] = value
    return tokens


def _markers_in(source: str) -> tuple[str, ...]:
    return tuple(m for m in _TURN_MARKERS if m in source)


def find_model_template(path: str | os.PathLike) -> ChatTemplate | None:
    """A model's own chat template: from its Hugging Face folder's files or its GGUF metadata
    (None when it has none, or `path` is neither)."""
    from .gguf.format import read_gguf
    from .weights.gguf_model import is_gguf_file

    path = Path(path)
    if path.is_dir():
        return ChatTemplate.from_folder(path)
    if is_gguf_file(path):
        return ChatTemplate.from_gguf_metadata(read_gguf(path).metadata)
    return None


def resolve_chat_template(found: ChatTemplate | None, *, override: str | ChatTemplate | None = None,
                          missing: str = "error") -> ChatTemplate:
    """The template to chat with.

    found: the model's own template (`ChatTemplate.from_folder` / `from_gguf_metadata` /
      `from_tokenizer_config`), None when it has none.
    override: replaces it: a ChatTemplate, a built-in name ("chatml", ..., "plain") or Jinja
      text (recognised by "{{" or "{%").
    missing: what a model without a template gets: "error" (raise InvalidArgument naming the
      built-ins), "plain" (the plain-text transcript for base models), or a built-in name.
    """
    if isinstance(override, ChatTemplate):
        return override
    if isinstance(override, str):
        if "{{" in override or "{%" in override:
            return ChatTemplate(override, name="custom", stop=_markers_in(override))
        return ChatTemplate.builtin(override)
    if override is not None:
        raise InvalidArgument(f"override must be a template name or Jinja text, got {type(override).__name__}")
    if found is not None:
        return found
    if missing == "error":
        raise InvalidArgument(f"this model has no chat template: choose a built-in one ({', '.join(BUILTIN_NAMES)}), "
                              f"give a Jinja template, or use {PLAIN!r} (a plain transcript, for base models)")
    return ChatTemplate.builtin(missing)


# ------------------------------------------------------------------ prompt -> ids
def template_variables(tokenizer: Tokenizer) -> dict[str, str]:
    """The tokenizer's special tokens as template variables (bos_token, eos_token, pad_token)."""
    pairs = (("bos_token", tokenizer.bos_token), ("eos_token", tokenizer.eos_token), ("pad_token", tokenizer.pad_token))
    return {k: v for k, v in pairs if v is not None}


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """The ids the model reads for a rendered prompt.

    Special tokens written in the text ("<s>", "<|im_start|>") become their ids. BOS is the
    template's business (most write `bos_token` themselves), so it is not added again; but a
    tokenizer that starts every prompt with BOS (`add_bos`) gets it when the text did not
    begin with it (the plain fallback, Vicuna), as llama.cpp does.
    """
    ids = tokenizer.encode(prompt, add_bos=False)
    if tokenizer.add_bos and tokenizer.bos_id is not None and ids[:1] != [tokenizer.bos_id]:
        ids = [tokenizer.bos_id, *ids]
    return ids


# ------------------------------------------------------------------ context management
POLICIES = ("drop-oldest", "condense", "error")
DEFAULT_NOTE = "[{n} earlier messages omitted]"


@dataclass(frozen=True)
class ContextFit:
    """A conversation cut to fit the context window, with a report of the cut.

    messages: what to render: the kept messages, with the condense note when there is one.
    prompt / token_ids: `messages` rendered, and its ids (`encode_prompt`): what the model reads.
    budget: tokens the prompt may use (context window - tokens reserved for the reply).
    policy: the policy applied.
    kept / dropped: indices into the input messages, in order; `dropped` are whole turns.
    dropped_messages: the dropped messages themselves (copies), oldest first.
    note: the text of the note standing for the dropped messages ("condense"), else None.
    note_in: where the note went: "system" (the system prompt) or "user" (prefixed to the
      first kept user message, for templates that refuse system messages), else None.
    """

    messages: list[dict[str, Any]]
    prompt: str
    token_ids: list[int]
    budget: int
    policy: str
    kept: tuple[int, ...]
    dropped: tuple[int, ...]
    dropped_messages: tuple[dict[str, Any], ...]
    note: str | None = None
    note_in: str | None = None

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def truncated(self) -> bool:
        return bool(self.dropped)

    def describe(self) -> str:
        """One line for a user: what was dropped, and the tokens used."""
        used = f"{self.n_tokens} of {self.budget} prompt tokens"
        if not self.dropped:
            return f"nothing dropped ({used})"
        how = f", left a note: {self.note!r}" if self.note else ""
        return f"dropped the {len(self.dropped)} oldest messages (indices {list(self.dropped)}){how} ({used})"


def fit_context(messages: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, template: ChatTemplate, *,
                context_window: int, reserve: int, policy: str = "drop-oldest",
                add_generation_prompt: bool = True, note_format: str = DEFAULT_NOTE,
                **variables: Any) -> ContextFit:
    """The most recent part of a conversation whose prompt leaves `reserve` tokens free.

    The prompt is `template` rendered with the tokenizer's special tokens (`template_variables`,
    replacing the template's defaults) and `variables` (replacing both), and counted with
    `encode_prompt`. It fits when it has at most `context_window - reserve` tokens.

    The conversation is: the leading system messages (always kept), then turns (a user message
    and every message after it up to the next user message; a turn before the first user
    message is the messages there), then the latest turn (from the last user message on, or
    the last message alone), always kept. When the whole conversation does not fit:

    * "drop-oldest": drop the fewest oldest turns that make it fit; pairs stay together, so
      templates that check user/assistant alternation keep working.
    * "condense": the same, and leave `note_format.format(n=<messages dropped>)` where they
      were: appended to the (first) system message, or as a system message of its own; when
      the template refuses system messages (Mistral), prefixed to the first kept user
      message. The note's own tokens are counted; when only a bare prompt fits, no note.
    * "error": refuse (InvalidArgument with the token counts).

    Raises InvalidArgument when the system messages and the latest turn do not fit alone,
    saying by how many tokens; nothing is ever cut inside a message.
    """
    if policy not in POLICIES:
        raise InvalidArgument(f"unknown context policy {policy!r} (use {', '.join(POLICIES)})")
    for label, value in (("context_window", context_window), ("reserve", reserve)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InvalidArgument(f"{label} must be a non-negative integer, got {value!r}")
    if reserve >= context_window:
        raise InvalidArgument(f"reserve={reserve} leaves no room for a prompt in a context window of {context_window}")
    if policy == "condense":
        try:
            note_format.format(n=0)
        except (KeyError, IndexError, ValueError, AttributeError) as e:
            raise InvalidArgument(f"note_format {note_format!r} must use only {{n}}: {_one_line(str(e))}") from None
    if not isinstance(tokenizer, Tokenizer):
        raise InvalidArgument(f"tokenizer must be an emergence Tokenizer, got {type(tokenizer).__name__}")
    msgs = _plain_messages(messages)
    budget = context_window - reserve
    context = {**template_variables(tokenizer), **variables}

    head, turns = _split_turns(msgs)

    def dropped_by(n_drop: int) -> list[int]:
        return [i for turn in turns[:n_drop] for i in turn]

    def render(kept: list[dict[str, Any]], note_in: str | None = None) -> _Attempt:
        prompt = template._render(kept, add_generation_prompt, context, refusal_passes=note_in == "system")
        return _Attempt(kept, prompt, encode_prompt(tokenizer, prompt), note_in)

    def attempt(n_drop: int, with_note: bool) -> _Attempt:
        dropped = set(dropped_by(n_drop))
        kept = [m for i, m in enumerate(msgs) if i not in dropped]
        if not (with_note and dropped):
            return render(kept)
        note = note_format.format(n=len(dropped))
        try:
            got = render(_note_in_system(kept, head, note), "system")
            if note in got.prompt:
                return got
        except _Refusal:  # e.g. Mistral: "Only user and assistant roles are supported!"
            pass
        # The template refuses or ignores (Phi-3) system messages: the note leads the first user message.
        got = render(_note_in_user(kept, head, note), "user")
        return got if note in got.prompt else render(kept)

    def result(n_drop: int, got: _Attempt) -> ContextFit:
        dropped = dropped_by(n_drop)
        kept = tuple(i for i in range(len(msgs)) if i not in set(dropped))
        note = note_format.format(n=len(dropped)) if got.note_in else None
        return ContextFit(got.messages, got.prompt, got.ids, budget, policy, kept, tuple(dropped),
                          tuple(msgs[i] for i in dropped), note, got.note_in)

    whole = attempt(0, False)
    if len(whole.ids) <= budget:
        return result(0, whole)
    window = f"the context window of {context_window} tokens with {reserve} reserved for the reply"
    if policy == "error":
        raise InvalidArgument(f"the conversation takes {len(whole.ids)} tokens, {len(whole.ids) - budget} more than "
                              f"{window} allows (context policy 'error'; 'drop-oldest' or 'condense' drop old turns)")
    bare = attempt(len(turns), False) if turns else whole
    if len(bare.ids) > budget:
        tail = turns[-1][-1] + 1 if turns else head
        latest = "the latest message" if tail == len(msgs) - 1 else f"the latest turn (messages {tail}-{len(msgs) - 1})"
        kept_what = f"the system prompt and {latest} alone need" if head else f"{latest} alone needs"
        raise InvalidArgument(f"{kept_what} {len(bare.ids)} tokens, {len(bare.ids) - budget} more than {window} allows")
    with_note = policy == "condense"
    if with_note and len(attempt(len(turns), True).ids) > budget:
        return result(len(turns), bare)  # not even the note fits: drop every old turn, without it
    # The fewest turns to drop. Dropping more turns makes the prompt shorter (for any sensible
    # template), so bisect; whatever is returned has been rendered and counted, and fits.
    lo, hi, fitting = 1, len(turns), {}
    while lo < hi:
        mid = (lo + hi) // 2
        got = attempt(mid, with_note)
        if len(got.ids) <= budget:
            hi, fitting[mid] = mid, got
        else:
            lo = mid + 1
    return result(hi, fitting.get(hi) or attempt(hi, with_note))


@dataclass(frozen=True)
class _Attempt:
    messages: list[dict[str, Any]]
    prompt: str
    ids: list[int]
    note_in: str | None


def _split_turns(msgs: list[dict[str, Any]]) -> tuple[int, list[list[int]]]:
    """(number of leading system messages, the droppable turns as lists of indices)."""
    head = 0
    while head < len(msgs) - 1 and msgs[head]["role"] == "system":
        head += 1
    users = [i for i in range(head, len(msgs)) if msgs[i]["role"] == "user"]
    tail = users[-1] if users else len(msgs) - 1
    turns: list[list[int]] = []
    for i in range(head, tail):
        if not turns or msgs[i]["role"] == "user":
            turns.append([])
        turns[-1].append(i)
    return head, turns


def _note_in_system(kept: list[dict[str, Any]], head: int, note: str) -> list[dict[str, Any]]:
    if head and isinstance(kept[0].get("content"), str):
        first = {**kept[0], "content": f"{kept[0]['content']}\n\n{note}"}
        return [first, *kept[1:]]
    return [*kept[:head], {"role": "system", "content": note}, *kept[head:]]


def _note_in_user(kept: list[dict[str, Any]], head: int, note: str) -> list[dict[str, Any]]:
    out = list(kept)
    for i in range(head, len(out)):
        if out[i]["role"] == "user" and isinstance(out[i].get("content"), str):
            out[i] = {**out[i], "content": f"{note}\n\n{out[i]['content']}"}
            return out
    return out
