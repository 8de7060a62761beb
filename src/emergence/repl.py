"""The interactive chat of `emergence chat` and `emergence run`, with Ollama's in-chat commands.

The conversation is a list of messages rendered by a chat template: the model's own, an
override (--chat-template, a store model's TEMPLATE), or for a base model without one the
plain transcript ("User: ...", "Assistant: ...", the server's fallback too), so turns are
always separated. Before each reply it is fitted into the context window by the context
policy (drop-oldest, condense or error: chat.fit_context), never cutting the latest message.

Lines starting with "/" are commands, as in `ollama run`:

    /set parameter NAME VALUE   a sampling parameter, Modelfile names (temperature, top_k,
                                top_p, min_p, typical_p, repeat_penalty, presence_penalty,
                                frequency_penalty, seed, num_predict, stop)
    /set system TEXT            the system message
    /show info | parameters | system | template
    /clear                      forget the conversation (the system message stays)
    /bye, /exit                 leave (so does Ctrl-D)
    /?, /help                   the commands
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable

from .api import LanguageModel
from .chat import ChatTemplate, fit_context
from .errors import EmergenceError
from .sampling import SamplingParams

HELP = """Available commands:
  /set parameter NAME VALUE   set a sampling parameter (temperature, top_k, top_p, min_p, typical_p,
                              repeat_penalty, presence_penalty, frequency_penalty, seed, num_predict, stop)
  /set system TEXT            set the system message
  /show info                  the model's details
  /show parameters            the sampling parameters in use
  /show system                the system message
  /show template              the chat template
  /clear                      forget the conversation (the system message stays)
  /bye                        leave (also /exit or Ctrl-D)
  /?, /help                   this list
"""


class ChatSession:
    """One conversation with a model; `run()` reads lines until /bye or the end of input."""

    def __init__(self, lm: LanguageModel, params: SamplingParams, template: ChatTemplate, *, policy: str,
                 system: str | None = None, out=None, err=None) -> None:
        self.lm, self.params, self.template, self.policy = lm, params, template, policy
        self.system = system
        self.messages: list[dict] = []
        self.out, self.err = out or sys.stdout, err or sys.stderr

    def run(self, read: Callable[[str], str] = input) -> None:
        print(f"chatting with {self.lm.config.name} ({self.template.name} template; context policy {self.policy}). "
              "Type /? for help, /bye or Ctrl-D to leave.", file=self.err)
        while True:
            try:
                line = read("> ")
            except EOFError:
                print(file=self.err)
                return
            if line.strip().startswith("/"):
                if not self.command(line.strip()):
                    return
                continue
            self.reply(line)

    def reply(self, line: str) -> None:
        """Answer one user message, streaming the reply."""
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages
        messages.append({"role": "user", "content": line})
        reserve = min(self.params.max_new_tokens, self.lm.config.block_size // 2)
        try:
            fit = fit_context(messages, self.lm.tokenizer, self.template, context_window=self.lm.config.block_size,
                              reserve=reserve, policy=self.policy)
        except EmergenceError as e:  # the message is not answered, nor kept; the chat goes on
            print(f"error: {e} (/clear starts afresh)", file=self.err)
            return
        if fit.dropped:
            print(f"({fit.describe()})", file=self.err)
        stop = tuple(dict.fromkeys((*self.params.stop, *self.template.stop)))
        reply = ""
        for piece in self.lm.stream(fit.token_ids, **{**_fields(self.params), "stop": stop}):
            reply += piece
            self.out.write(piece)
            self.out.flush()
        self.out.write("\n")
        self.messages += [{"role": "user", "content": line}, {"role": "assistant", "content": reply}]

    def command(self, line: str) -> bool:
        """Carry out an in-chat command; False when it ends the chat."""
        from .store import parse_parameter

        words = line.split(None, 2)
        verb = words[0].lower()
        if verb in ("/bye", "/exit", "/quit"):
            return False
        if verb in ("/?", "/help"):
            self.err.write(HELP)
        elif verb == "/clear":
            self.messages = []
            print("Cleared session context.", file=self.err)
        elif verb == "/set" and len(words) == 3 and words[1] == "system":
            self.system = words[2]
            print("Set system message.", file=self.err)
        elif verb == "/set" and len(words) == 3 and words[1] == "parameter":
            try:
                field, value = parse_parameter(words[2], "/set parameter")
                self.params = dataclasses.replace(self.params, **{field: (value,) if field == "stop" else value})
            except EmergenceError as e:
                print(f"error: {e}", file=self.err)
            else:
                print(f"Set parameter '{words[2].split()[0]}' to '{words[2].split(None, 1)[1]}'", file=self.err)
        elif verb == "/show" and len(words) == 2 and words[1] in ("info", "parameters", "system", "template"):
            self.err.write(self._show(words[1]))
        elif verb in ("/set", "/show"):
            print(f"usage: {'/set parameter NAME VALUE, /set system TEXT' if verb == '/set' else '/show info|parameters|system|template'}",
                  file=self.err)
        else:
            print(f"Unknown command '{words[0]}'. Type /? for help", file=self.err)
        return True

    def _show(self, what: str) -> str:
        c = self.lm.config
        if what == "info":
            return (f"  model         {c.name}\n  architecture  {c.family}\n  parameters    "
                    f"{self.lm.model.num_parameters():,}\n  context       {c.block_size:,}\n")
        if what == "parameters":
            defaults = SamplingParams()
            changed = {f.name: getattr(self.params, f.name) for f in dataclasses.fields(self.params)
                       if getattr(self.params, f.name) != getattr(defaults, f.name)}
            return "".join(f"  {k:20} {v}\n" for k, v in changed.items()) or "  (the defaults)\n"
        if what == "system":
            return f"{self.system}\n" if self.system else "  (no system message)\n"
        return f"  {self.template.name}\n{self.template.source}\n"


def _fields(params: SamplingParams) -> dict:
    return {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}
