"""emergence.chat: chat templates rendered exactly as transformers' apply_chat_template renders
them (every template in shared/data/chat_templates and the model families' own templates in
tests/data/chat_templates, conversations with system prompts, unicode and Jinja-looking text),
the sandbox, template sources (tokenizer_config.json, folders, GGUF, built-ins, the fallback
for base models), and fitting a conversation into the context window with hand-counted tokens.
Nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers

from emergence.chat import (BUILTIN_NAMES, DEFAULT_NOTE, PLAIN, ChatTemplate, encode_prompt, fit_context,
                            resolve_chat_template, template_variables)
from emergence.errors import EmergenceError, InvalidArgument
from emergence.gguf import read_gguf, write_gguf
from emergence.tokenizer import Tokenizer

from conftest import SHARED_DATA, bounded, shared_files, word_level_tokenizer  # noqa: E402

TEMPLATES = SHARED_DATA / "chat_templates"
TEMPLATE_FILES = shared_files("chat_templates", "*.json")
GPT2 = SHARED_DATA / "gpt2_tokenizer"

# Exercises the environment transformers sets up: trim_blocks / lstrip_blocks around indented
# tags, namespace, loop controls, tojson (no HTML escaping, unicode kept, keyword arguments),
# dict, the {% generation %} block, and the tools / documents variables.
FEATURES_TEMPLATE = """\
{%- set ns = namespace(n=0) -%}
{% for m in messages %}
    {% if m['role'] == 'system' %}
        {% continue %}
    {% endif %}
    {% set ns.n = ns.n + 1 %}
    <{{ m['role'] }} {{ ns.n }}>{{ m | tojson }}
    {% if m['role'] == 'assistant' %}
        {% generation %}[{{ m['content'] | trim }}]{% endgeneration %}
    {% endif %}
    {% if ns.n >= 4 %}{% break %}{% endif %}
{% endfor %}
{{ dict(count=ns.n, tools=tools, docs=documents, first=messages[0]['content']) | tojson(sort_keys=True, indent=1) }}
{{ bos_token ~ '|' ~ eos_token }}
{% if add_generation_prompt %}
<assistant>
{% endif %}"""

CONVERSATIONS = {
    "system-multi-turn": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ],
    "no-system-ends-with-assistant": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "Why did the chicken cross the road?"},
    ],
    "single-user": [{"role": "user", "content": "Once upon a time"}],
    "unicode": [
        {"role": "system", "content": "Ты — полезный помощник. 你好 🙂"},
        {"role": "user", "content": "héllo wörld — ☃ \u200b <b>&amp;</b> \"quoted\" 'single'"},
        {"role": "assistant", "content": "¡Sí! 🎉 ñ"},
        {"role": "user", "content": "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \U0001f600"},
    ],
    "jinja-looking": [
        {"role": "user", "content": "{{ 7*7 }} {% if true %}x{% endif %} {# comment #} {{ raise_exception('no') }}"},
        {"role": "assistant", "content": "{% endfor %} {{ messages }} {%- raw %}"},
        {"role": "user", "content": "{{ bos_token }} {{ ''.__class__.__mro__ }}"},
    ],
    "whitespace": [
        {"role": "user", "content": "  padded  \n\n"},
        {"role": "assistant", "content": "\tanswer with a trailing newline\n"},
        {"role": "user", "content": "\n"},
    ],
    "user-then-system": [  # Mistral refuses the role; others skip or render it
        {"role": "user", "content": "first"},
        {"role": "system", "content": "late system note"},
    ],
}


def config_tokens(path: Path) -> dict[str, str]:
    config = json.loads(path.read_text())
    tokens = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = config.get(key)
        if isinstance(value, dict):
            value = value["content"]
        if value is not None:
            tokens[key] = value
    return tokens


_HF_BACKEND = None


def hf_tokenizer(template: str, tokens: dict[str, str]):
    """transformers' fast tokenizer over the GPT-2 vocabulary, with `template` and `tokens`."""
    from transformers import PreTrainedTokenizerFast

    global _HF_BACKEND
    if _HF_BACKEND is None:
        _HF_BACKEND = tokenizers.Tokenizer.from_file(str(GPT2 / "tokenizer.json")).to_str()
    tok = PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer.from_str(_HF_BACKEND), **tokens)
    tok.chat_template = template
    return tok


def assert_same_render(ours: ChatTemplate, reference, messages: list[dict], add_generation_prompt: bool,
                       template_kwargs: dict | None = None, **variables) -> bool:
    """Our render equals transformers', or both refuse with the same message. `template_kwargs`
    (enable_thinking=..., tools=...) go to both; `variables` (the special tokens, which the
    reference tokenizer holds already) to ours only. True when both rendered, False when both
    refused."""
    from jinja2.exceptions import TemplateError

    kwargs = dict(template_kwargs or {})
    try:
        expected = reference.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                 tokenize=False, **kwargs)
    except TemplateError as e:  # raise_exception in the template
        with pytest.raises(InvalidArgument) as caught:
            ours.render(messages, add_generation_prompt=add_generation_prompt, **variables, **kwargs)
        assert str(e) in str(caught.value) and "\n" not in str(caught.value)
        return False
    got = ours.render(messages, add_generation_prompt=add_generation_prompt, **variables, **kwargs)
    assert got == expected
    return True


# ------------------------------------------------------------------ parity with transformers
@pytest.mark.parametrize("path", TEMPLATE_FILES, ids=lambda p: p.stem.split(".")[0])
def test_every_shared_template_renders_as_transformers(path):
    """Each file's template, read through from_tokenizer_config, on every conversation, with and
    without the generation prompt; tokens from the file, else the built-in's usual ones."""
    source = json.loads(path.read_text())["chat_template"]
    tokens = config_tokens(path) or ChatTemplate.builtin(path.stem).special_tokens
    reference = hf_tokenizer(source, tokens)
    ours = ChatTemplate.from_tokenizer_config(path)
    assert ours.source == source
    for messages in CONVERSATIONS.values():
        for add_generation_prompt in (False, True):
            assert_same_render(ours, reference, messages, add_generation_prompt, **tokens)


# ------------------------------------------------------------------ the model families' own templates
# The published templates of the families emergence runs (Qwen3, Gemma 2 and 3, Phi-3 / 3.5,
# OLMo 2, SmolLM3, Falcon 2), verbatim, one JSON file each with the special tokens the template
# reads; SOURCES.md beside them says where each text was taken from.
FAMILY_TEMPLATES = Path(__file__).resolve().parent / "data" / "chat_templates"

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city, now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city's name"}},
                   "required": ["city"]}}}]

FAMILY_CONVERSATIONS = {
    **CONVERSATIONS,
    "reasoning": [  # Qwen3 splits the thinking out of earlier replies
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>\nTwo plus two.\n</think>\n\n4"},
        {"role": "user", "content": "And 3+3?"},
    ],
    "tool-call": [
        {"role": "system", "content": "Use the tools."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": '{"temp_c": 18}'},
        {"role": "assistant", "content": "It is 18 °C."},
        {"role": "user", "content": "Thanks"},
    ],
}

# file stem -> (conversations the template refuses with raise_exception, in transformers as in
# emergence, with and without the generation prompt; template arguments each also rendered with)
FAMILIES: dict[str, tuple[tuple[str, ...], tuple[dict, ...]]] = {
    "qwen3-0.6b": ((), ({"enable_thinking": False}, {"tools": TOOLS})),
    # "System role not supported"; user/assistant must alternate (the tool message breaks it)
    "gemma-2-2b-it": (("system-multi-turn", "unicode", "tool-call"), ()),
    "gemma-3-it": (("tool-call",), ()),  # the system prompt joins the first user turn; roles alternate
    "phi-3-mini-4k-instruct": ((), ()),
    "phi-3-medium-4k-instruct": ((), ()),
    "phi-3.5-mini-instruct": ((), ()),
    "olmo-2-1124-instruct": ((), ()),
    "smollm3-3b": ((), ({"enable_thinking": False}, {"tools": TOOLS})),
    "falcon2-11b": ((), ()),
}


def test_family_template_files_are_all_listed_with_sources():
    assert sorted(p.stem for p in FAMILY_TEMPLATES.glob("*.json")) == sorted(FAMILIES)
    sources = (FAMILY_TEMPLATES / "SOURCES.md").read_text(encoding="utf-8")
    for stem in FAMILIES:
        assert f"`{stem}.json`" in sources


@pytest.mark.parametrize("stem", sorted(FAMILIES))
def test_model_family_templates_render_as_transformers(stem):
    """Each family's template, read through from_tokenizer_config, on every conversation (the
    shared ones, a reply with <think>, a tool call), with and without the generation prompt,
    plain and with the template's own arguments: equal to transformers', or refused by both
    with the same message, exactly where the template refuses."""
    path = FAMILY_TEMPLATES / f"{stem}.json"
    refuses, variants = FAMILIES[stem]
    source = json.loads(path.read_text(encoding="utf-8"))["chat_template"]
    tokens = config_tokens(path)
    reference = hf_tokenizer(source, tokens)
    ours = ChatTemplate.from_tokenizer_config(path)
    assert ours.source == source and ours.special_tokens == tokens
    plain = ours.render(CONVERSATIONS["single-user"], add_generation_prompt=True)
    for extra in ({}, *variants):
        refused = set()
        for name, messages in FAMILY_CONVERSATIONS.items():
            for add_generation_prompt in (False, True):
                if not assert_same_render(ours, reference, messages, add_generation_prompt, extra, **tokens):
                    refused.add((name, add_generation_prompt))
        assert refused == {(name, agp) for name in refuses for agp in (False, True)}
        if extra:  # the argument reaches the template (and changes what it writes)
            assert ours.render(CONVERSATIONS["single-user"], add_generation_prompt=True, **extra) != plain


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_builtins_are_the_reference_templates_and_render_as_transformers(name):
    """The texts shipped in emergence.chat are the shared reference files', and render with
    their default special tokens exactly as transformers does with the same tokens."""
    source = json.loads((TEMPLATES / f"{name}.json").read_text())["chat_template"]
    ours = ChatTemplate.builtin(name)
    assert ours.source == source
    reference = hf_tokenizer(source, dict(ours.special_tokens))
    for messages in CONVERSATIONS.values():
        for add_generation_prompt in (False, True):
            assert_same_render(ours, reference, messages, add_generation_prompt)


def test_environment_features_render_as_transformers():
    tokens = {"bos_token": "<s>", "eos_token": "</s>"}
    reference = hf_tokenizer(FEATURES_TEMPLATE, tokens)
    ours = ChatTemplate(FEATURES_TEMPLATE, special_tokens=tokens)
    for messages in CONVERSATIONS.values():
        for add_generation_prompt in (False, True):
            assert_same_render(ours, reference, messages, add_generation_prompt)
    got = ours.render(CONVERSATIONS["unicode"], add_generation_prompt=True)
    assert "<b>&amp;</b>" in got and "Ты" in got  # tojson escapes neither HTML nor unicode
    assert got.endswith("<s>|</s>\n<assistant>\n")


def test_message_text_is_data_not_template():
    text = "{{ 7*7 }} {% for x in y %}{{ x }}{% endfor %}"
    got = ChatTemplate.builtin("chatml").render([{"role": "user", "content": text}])
    assert got == f"<|im_start|>user\n{text}<|im_end|>\n"
    assert "49" not in got


def test_tinyllama_config_uses_its_own_special_tokens():
    template = ChatTemplate.from_tokenizer_config(TEMPLATES / "tinyllama-1.1b-chat-v1.0.tokenizer_config.json")
    assert template.special_tokens == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                                       "pad_token": "</s>"}
    got = template.render([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
                          add_generation_prompt=True)
    assert got == "<|system|>\nS</s>\n<|user|>\nU</s>\n<|assistant|>\n"
    # A caller's variable replaces the file's.
    assert template.render([{"role": "user", "content": "U"}], eos_token="<E>") == "<|user|>\nU<E>\n"


# ------------------------------------------------------------------ errors: one line, never a traceback
@pytest.mark.parametrize("source, message", [
    ("{{ ''.__class__.__mro__ }}", "unsafe"),
    ("{{ ''.__class__ }}", "unsafe"),  # transformers renders "" here; we stop at once
    ("{{ messages.__class__.__base__.__subclasses__() }}", "unsafe"),
    ("{{ cycler.__init__.__globals__ }}", "unsafe"),
    ("{{ raise_exception.__globals__ }}", "unsafe"),
    ("{{ messages.append({'role': 'x'}) }}", "unsafe"),
    ("{{ messages[0].update(role='x') }}", "unsafe"),
    ("{% set ns = namespace(_private=1) %}", "private name"),
    ("{% set ns = namespace() %}{% set ns.__class__ = 1 %}", "private name"),
    ("{{ 'a' * 10**9 }}", "items"),
    ("{{ [1] * 10**9 }}", "items"),
    ("{{ 10 ** 10000000 }}", "bits"),
    ("{% for i in range(10**9) %}{% endfor %}", "range"),
])
def test_sandbox_refuses_with_one_line(source, message):
    with bounded(seconds=5, max_new_rss_mb=64):
        with pytest.raises(InvalidArgument) as caught:
            ChatTemplate(source, name="hostile").render([{"role": "user", "content": "hi"}])
    text = str(caught.value)
    assert isinstance(caught.value, EmergenceError)
    assert message in text and "hostile" in text and "\n" not in text
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_raise_exception_is_a_one_line_refusal():
    alternating = "Conversation roles must alternate user/assistant/user/assistant/..."
    two_users = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    for name in ("llama2", "mistral", "vicuna"):
        with pytest.raises(InvalidArgument, match=f"^chat template {name} refused the conversation: "
                                                  f"{alternating.replace('.', '[.]')}$"):
            ChatTemplate.builtin(name).render(two_users)
    with pytest.raises(InvalidArgument, match="refused the conversation: Only user and assistant roles"):
        ChatTemplate.builtin("mistral").render(CONVERSATIONS["user-then-system"])
    with pytest.raises(InvalidArgument, match="refused the conversation: multi line$"):
        ChatTemplate("{{ raise_exception('multi\nline') }}").render([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("source, message", [
    ("{% if %}", "does not parse: line 1"),
    ("{% for m in messages %}", "does not parse"),
    ("{% unknowntag %}", "does not parse"),
])
def test_broken_template_source(source, message):
    with pytest.raises(InvalidArgument, match=message):
        ChatTemplate(source)


@pytest.mark.parametrize("source, message", [
    ("{{ missing_var + 'x' }}", "'missing_var' is undefined"),
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ("{{ messages[0]['content'] + 1 }}", "TypeError"),
])
def test_template_runtime_errors(source, message):
    with pytest.raises(InvalidArgument, match=message) as caught:
        ChatTemplate(source).render([{"role": "user", "content": "x"}])
    assert "\n" not in str(caught.value)


def test_llama2_without_bos_token_names_the_variable():
    template = ChatTemplate(ChatTemplate.builtin("llama2").source, name="llama2-no-tokens")
    with pytest.raises(InvalidArgument, match="'bos_token' is undefined"):
        template.render([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("messages, message", [
    ([], "empty"),
    ("hello", "list of"),
    ({"role": "user", "content": "x"}, "list of"),
    (["hello"], "message 0 must be a dict"),
    ([{"content": "x"}], "message 0 has no 'role'"),
    ([{"role": "user", "content": "x"}, {"role": 3, "content": "y"}], "message 1 has no 'role'"),
    ([{"role": "user", "content": 5}], "'content' must be"),
    ([{"role": "user", "content": "x", "extra": object()}], "JSON-like"),
])
def test_bad_messages(messages, message):
    with pytest.raises(InvalidArgument, match=message):
        ChatTemplate.builtin("chatml").render(messages)


def test_none_fields_are_dropped_and_inputs_untouched():
    messages = [{"role": "user", "content": "x", "name": None}]
    template = ChatTemplate("{{ messages[0].name is defined }}")
    assert template.render(messages) == "False"
    assert messages == [{"role": "user", "content": "x", "name": None}]


# ------------------------------------------------------------------ template sources
def test_named_templates_in_tokenizer_config():
    config = {"bos_token": {"content": "<B>", "__type": "AddedToken"}, "eos_token": "<E>",
              "chat_template": [{"name": "default", "template": "{{ bos_token }}D{{ eos_token }}"},
                                {"name": "tool_use", "template": "T"}]}
    msgs = [{"role": "user", "content": "x"}]
    assert ChatTemplate.from_tokenizer_config(config).render(msgs) == "<B>D<E>"
    assert ChatTemplate.from_tokenizer_config(config, name="tool_use").render(msgs) == "T"
    with pytest.raises(InvalidArgument, match="no chat template named 'rag'.*default, tool_use"):
        ChatTemplate.from_tokenizer_config(config, name="rag")
    no_default = {"chat_template": [{"name": "tool_use", "template": "T"}]}
    with pytest.raises(InvalidArgument, match="no chat template named 'default'"):
        ChatTemplate.from_tokenizer_config(no_default)
    assert ChatTemplate.from_tokenizer_config({"bos_token": "<s>"}) is None
    assert ChatTemplate.from_tokenizer_config({"chat_template": None}) is None


def test_folder_sources(tmp_path):
    assert ChatTemplate.from_folder(GPT2) is None  # a base model's tokenizer: no template
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": "{{ bos_token }}config"}))
    assert ChatTemplate.from_folder(tmp_path).render([{"role": "user", "content": "x"}]) == "<s>config"
    (tmp_path / "chat_template.jinja").write_text("{{ eos_token }}jinja<|im_end|>")
    found = ChatTemplate.from_folder(tmp_path)  # the separate file wins, as in transformers
    assert found.render([{"role": "user", "content": "x"}]) == "</s>jinja<|im_end|>"
    assert found.stop == ("<|im_end|>",)
    with pytest.raises(InvalidArgument, match="single chat template"):
        ChatTemplate.from_folder(tmp_path, name="tool_use")


def test_gguf_metadata_round_trip(tmp_path):
    """A GGUF file written with a template (and the tiny Llama's vocabulary) gives it back,
    with BOS / EOS looked up by id in the file's token list."""
    source = ChatTemplate.builtin("llama2").source
    base = read_gguf(SHARED_DATA / "gguf_models" / "llama-2-tiny-random.gguf")
    keep = {k: v for k, v in base.fields.items() if k.startswith(("general.", "tokenizer."))}
    write_gguf(tmp_path / "chat.gguf", {**keep, "tokenizer.chat_template": source,
                                        "tokenizer.chat_template.rag": "RAG"}, [])
    metadata = read_gguf(tmp_path / "chat.gguf").metadata
    template = ChatTemplate.from_gguf_metadata(metadata)
    assert template.source == source
    assert template.special_tokens["bos_token"] == "<s>" and template.special_tokens["eos_token"] == "</s>"
    msgs = CONVERSATIONS["system-multi-turn"]
    assert template.render(msgs) == ChatTemplate.builtin("llama2").render(msgs)
    assert ChatTemplate.from_gguf_metadata(metadata, name="rag").render(msgs) == "RAG"
    assert ChatTemplate.from_gguf_metadata(base.metadata) is None
    with pytest.raises(InvalidArgument, match="no chat template named 'tools'"):
        ChatTemplate.from_gguf_metadata(metadata, name="tools")


def test_missing_template_is_an_explicit_choice():
    with pytest.raises(InvalidArgument) as caught:
        resolve_chat_template(None)
    for name in (*BUILTIN_NAMES, PLAIN):
        assert name in str(caught.value)
    plain = resolve_chat_template(None, missing="plain")
    got = plain.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}],
                       add_generation_prompt=True)
    assert got == "Be brief.\n\nUser: Hi\nAssistant: Hello.\nUser: 2+2?\nAssistant:"
    assert plain.stop == ("\nUser:",)
    assert resolve_chat_template(None, missing="chatml").name == "chatml"
    found = ChatTemplate("{{ 'mine' }}")
    assert resolve_chat_template(found) is found
    assert resolve_chat_template(found, override="llama3").name == "llama3"
    assert resolve_chat_template(found, override="{{ 'inline' }}").render([{"role": "user", "content": ""}]) \
        == "inline"
    with pytest.raises(InvalidArgument, match="unknown chat template 'llama9'.*chatml"):
        resolve_chat_template(found, override="llama9")


# ------------------------------------------------------------------ context management
# Word-level tokenizer from conftest: every whitespace-separated word is one token, so the
# prompt below costs 1 ("role:") + the words of each message, + 1 for "assistant:".
WORDS = ChatTemplate("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                     "{% if add_generation_prompt %}assistant:{% endif %}", name="words")
CHAT = [
    {"role": "system", "content": "s s"},    # 0: 3 tokens
    {"role": "user", "content": "a a a"},    # 1: 4   turn 1
    {"role": "assistant", "content": "b b b"},  # 2: 4
    {"role": "user", "content": "c c c"},    # 3: 4   turn 2
    {"role": "assistant", "content": "d d d"},  # 4: 4
    {"role": "user", "content": "e e e"},    # 5: 4   latest
]  # + 1 ("assistant:") = 24 tokens


@pytest.fixture(scope="module")
def words():
    return word_level_tokenizer()


def fit(words, messages=CHAT, budget=24, **kw):
    return fit_context(messages, words, WORDS, context_window=budget + 10, reserve=10, **kw)


def test_everything_fits(words):
    got = fit(words, budget=24)
    assert got.n_tokens == 24 and got.dropped == () and got.kept == tuple(range(6)) and not got.truncated
    assert got.messages == CHAT and got.token_ids == encode_prompt(words, got.prompt)
    assert got.describe() == "nothing dropped (24 of 24 prompt tokens)"
    assert fit(words, budget=24, policy="error").n_tokens == 24


@pytest.mark.parametrize("budget, dropped, n_tokens", [
    (23, (1, 2), 16),  # one token too many: the whole oldest turn goes, user and assistant together
    (16, (1, 2), 16),
    (15, (1, 2, 3, 4), 8),
    (8, (1, 2, 3, 4), 8),  # only the system prompt and the latest message are left
])
def test_drop_oldest(words, budget, dropped, n_tokens):
    got = fit(words, budget=budget)
    assert got.dropped == dropped and got.n_tokens == n_tokens and got.budget == budget
    assert got.kept == tuple(i for i in range(6) if i not in dropped)
    assert got.dropped_messages == tuple(CHAT[i] for i in dropped)
    assert got.messages == [CHAT[i] for i in got.kept] and got.note is None
    assert got.prompt == WORDS.render(got.messages, add_generation_prompt=True)
    assert f"dropped the {len(dropped)} oldest messages (indices {list(dropped)})" in got.describe()


def test_latest_message_that_cannot_fit_is_an_error(words):
    for policy in ("drop-oldest", "condense"):
        with pytest.raises(InvalidArgument, match="the system prompt and the latest message alone need 8 tokens, "
                                                  "1 more than the context window of 17 tokens with 10 reserved"):
            fit(words, budget=7, policy=policy)
    with pytest.raises(InvalidArgument, match="^the latest message alone needs 6 tokens, 3 more"):
        fit(words, messages=[{"role": "user", "content": "one two three four"}], budget=3)


def test_error_policy_refuses_with_the_counts(words):
    with pytest.raises(InvalidArgument, match="the conversation takes 24 tokens, 1 more than .*'error'"):
        fit(words, budget=23, policy="error")


@pytest.mark.parametrize("budget, dropped, note, n_tokens", [
    (20, (1, 2), "[2 earlier messages omitted]", 20),  # 16 + the note's 4 words
    (19, (1, 2, 3, 4), "[4 earlier messages omitted]", 12),  # one turn and a note do not fit 19
    (11, (1, 2, 3, 4), None, 8),  # the note does not fit at all: dropped without it
])
def test_condense(words, budget, dropped, note, n_tokens):
    got = fit(words, budget=budget, policy="condense")
    assert got.dropped == dropped and got.note == note and got.n_tokens == n_tokens
    if note:
        assert got.note_in == "system"
        assert got.messages[0] == {"role": "system", "content": f"s s\n\n{note}"}
        assert got.messages[1:] == [CHAT[i] for i in got.kept[1:]]
        assert f"left a note: {note!r}" in got.describe()
    else:
        assert got.note_in is None and got.messages == [CHAT[0], CHAT[5]]


def test_condense_without_system_prompt_adds_one(words):
    got = fit(words, messages=CHAT[1:], budget=17, policy="condense", note_format="(skipped {n})")
    # 21 tokens in all; dropping the first turn leaves 13, and "system: (skipped 2)" adds 3.
    assert got.dropped == (0, 1) and got.note == "(skipped 2)" and got.n_tokens == 16
    assert got.messages[0] == {"role": "system", "content": "(skipped 2)"}


def test_turn_boundaries(words):
    # An assistant greeting before the first user message is a turn of its own.
    msgs = [CHAT[0], {"role": "assistant", "content": "hello there"}, *CHAT[1:]]
    assert fit(words, messages=msgs, budget=25).dropped == (1,)
    # The latest turn is kept whole when it ends with the assistant's (partial) reply.
    msgs = CHAT[:5]  # ..., user "c c c", assistant "d d d": 20 tokens
    assert fit(words, messages=msgs, budget=18).dropped == (1, 2)
    with pytest.raises(InvalidArgument, match=r"the latest turn \(messages 3-4\) alone need 12 tokens, 1 more"):
        fit(words, messages=msgs, budget=11)
    # Several leading system messages are all kept.
    msgs = [CHAT[0], {"role": "system", "content": "more"}, *CHAT[1:]]
    assert fit(words, messages=msgs, budget=20).dropped == (2, 3)


def test_condense_with_a_template_that_refuses_system_messages(words):
    """Mistral raises on a system message, so the note leads the first kept user message; the
    pairs dropped keep the roles alternating."""
    mistral = ChatTemplate.builtin("mistral")
    chat = CHAT[1:]
    vars_ = template_variables(words)
    full = len(encode_prompt(words, mistral.render(chat, **vars_)))
    expected_messages = [{"role": "user", "content": "[2 earlier messages omitted]\n\nc c c"}, *chat[3:]]
    expected = mistral.render(expected_messages, **vars_)
    budget = len(encode_prompt(words, expected))
    assert budget < full
    got = fit_context(chat, words, mistral, context_window=budget + 5, reserve=5, policy="condense",
                      add_generation_prompt=False)
    assert got.dropped == (0, 1) and got.note_in == "user" and got.prompt == expected
    assert got.prompt.startswith("t1[INST] [2 earlier messages omitted]")  # the tokenizer's BOS is "t1"


@pytest.fixture(scope="module")
def gpt2():
    return Tokenizer.load(GPT2)


def test_llama2_long_chat_with_gpt2_tokens(gpt2):
    """A realistic run: Llama 2's template (which checks alternation) over GPT-2 tokens. The
    result fits, keeps the system prompt and the latest message, and is minimal: one more
    turn would not fit."""
    template = ChatTemplate.builtin("llama2")
    chat = [{"role": "system", "content": "You are terse."}]
    for i in range(12):
        chat += [{"role": "user", "content": f"Question {i}: what is {i} times {i}? " * 2},
                 {"role": "assistant", "content": f"{i * i}, as everyone knows."}]
    chat.append({"role": "user", "content": "Thanks, and what is 13 times 13?"})
    got = fit_context(chat, gpt2, template, context_window=256, reserve=64)
    assert got.n_tokens <= 192 < len(encode_prompt(gpt2, template.render(chat, **template_variables(gpt2))))
    assert got.kept[0] == 0 and got.kept[-1] == len(chat) - 1 and len(got.dropped) % 2 == 0
    assert got.dropped == tuple(range(1, 1 + len(got.dropped)))
    assert got.token_ids == gpt2.encode(got.prompt, add_bos=False)
    one_more = [chat[0], *chat[got.dropped[-2]:got.dropped[-1] + 1], *got.messages[1:]]
    assert len(encode_prompt(gpt2, template.render(one_more, **template_variables(gpt2)))) > 192
    assert got.prompt.startswith("<|endoftext|>[INST] <<SYS>>\nYou are terse.")  # GPT-2's BOS


def test_encode_prompt_adds_bos_only_when_missing(words):
    with_bos = word_level_tokenizer()
    with_bos.add_bos = True
    assert encode_prompt(with_bos, "a b") == [1, 3, 3]
    assert encode_prompt(with_bos, "t1 a b") == [1, 3, 3]
    assert encode_prompt(words, "a b") == [3, 3]


@pytest.mark.parametrize("kwargs, message", [
    ({"policy": "truncate-middle"}, "unknown context policy"),
    ({"context_window": 10, "reserve": 10}, "leaves no room"),
    ({"context_window": -1, "reserve": 0}, "non-negative"),
    ({"context_window": 10.5, "reserve": 0}, "non-negative integer"),
    ({"policy": "condense", "note_format": "{count} dropped"}, "note_format"),
])
def test_bad_context_arguments(words, kwargs, message):
    args = {"context_window": 40, "reserve": 10, **kwargs}
    with pytest.raises(InvalidArgument, match=message):
        fit_context(CHAT, words, WORDS, **args)


def test_default_note_mentions_the_count():
    assert DEFAULT_NOTE.format(n=3) == "[3 earlier messages omitted]"
