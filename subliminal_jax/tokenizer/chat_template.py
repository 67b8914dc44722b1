"""Chat templates rendered as transformers renders them, with the system turn made explicit.

The system turn is one :class:`SystemTurn` value (the paper's pitfall: SmolLM2's and Qwen2.5's
templates insert a default system prompt when none is given): ``SystemTurn("...")`` writes that
system turn, ``SystemTurn()`` writes NO system turn at all, ``SystemTurn(template_default=True)``
keeps the template's own default. ``SystemTurn.parse`` reads a config's spelling ("none",
"template_default" or the text itself), ``.choice`` names the choice for results files.

:class:`ChatTemplate` renders one template. Rendering without a system turn cuts the template's
default system block out; where that block sits is found by probe renders with sentinel texts
(see ``ChatTemplate._system_layout``), and every such render is cross-checked.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import json
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox

# The chat template Google ships with Gemma 3 (tokenizer_config.json of google/gemma-3-*): no
# system turn of its own; a system message is folded into the first user turn as "system\n\nuser".
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '

' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '

' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '
' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>
' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model
'}}
{%- endif -%}
"""

# Stand-ins used to locate a template's system block. Plain letters, so no template filter
# (trim, escaping) alters them.
_SENTINEL_SYSTEM = "SubliminalSentinelSystemTurnQx7"
_SENTINEL_USER = "SubliminalSentinelUserTurnZk4"

# The config spellings of the two choices that are not a system text.
_NONE_SPEC = "none"
_TEMPLATE_DEFAULT_SPEC = "template_default"


@dataclasses.dataclass(frozen=True)
class SystemTurn:
  """The system-turn choice of a chat, explicit: a system text, none at all, or the template's.

  ``SystemTurn()``: no system turn, even where the template would insert its default.
  ``SystemTurn("You love owls.")``: that system message, verbatim.
  ``SystemTurn(template_default=True)``: whatever the template does with no system message (its
  default system prompt, if any).
  """

  text: str | None = None
  template_default: bool = False

  def __post_init__(self) -> None:
    if self.text is not None and not isinstance(self.text, str):
      raise TypeError(f"the system text must be a str or None, got {type(self.text).__name__}: "
                      f"{self.text!r}")
    if not isinstance(self.template_default, bool):
      raise TypeError(f"template_default must be a bool, got "
                      f"{type(self.template_default).__name__}: {self.template_default!r}")
    if self.template_default and self.text is not None:
      raise ValueError(
          "A system turn is either a text or template_default=True, not both (got text="
          f"{self.text[:60]!r} with template_default=True).")

  @classmethod
  def parse(cls, spec: str) -> "SystemTurn":
    """The system turn a config spells as ``spec``: "none" (no system turn), "template_default"
    (the template's own default prompt) or any other text (that system prompt, verbatim)."""
    if not isinstance(spec, str) or not spec.strip():
      raise ValueError(f"a system turn is 'none', 'template_default' or a non-empty system prompt, "
                       f"got {spec!r}")
    if spec == _NONE_SPEC:
      return cls()
    if spec == _TEMPLATE_DEFAULT_SPEC:
      return cls(template_default=True)
    if spec == "default":  # the earlier spelling: as text it would silently become a system prompt
      raise ValueError("the system turn 'default' is spelled 'template_default' (the chat "
                       "template's own default prompt)")
    return cls(spec)

  @property
  def spec(self) -> str:
    """The config spelling :meth:`parse` reads back as this turn. A system text parse would read
    otherwise ("none", "default", blank) has none and raises ValueError."""
    if self.template_default:
      return _TEMPLATE_DEFAULT_SPEC
    if self.text is None:
      return _NONE_SPEC
    if self.text in (_NONE_SPEC, _TEMPLATE_DEFAULT_SPEC, "default") or not self.text.strip():
      raise ValueError(f"the system text {self.text!r} has no config spelling: SystemTurn.parse "
                       "reads it as something else")
    return self.text

  @property
  def choice(self) -> str:
    """A short, stable name for the choice, to record in results: "none", "template_default" or
    "custom:<first 8 hex of sha256(text)>"."""
    if self.template_default:
      return _TEMPLATE_DEFAULT_SPEC
    if self.text is None:
      return _NONE_SPEC
    return "custom:" + hashlib.sha256(self.text.encode("utf-8")).hexdigest()[:8]

  def to_dict(self) -> dict[str, Any]:
    """``{"system": text, "template_default": bool}``: the form stage fingerprints hash."""
    return {"system": self.text, "template_default": self.template_default}


def check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict]:
  """``messages`` as plain dicts (None values dropped); a "system" message is an error, since the
  system turn is a :class:`SystemTurn`."""
  if isinstance(messages, (str, Mapping)):
    raise TypeError("messages must be a list of {'role', 'content'} dicts, got "
                    f"{type(messages).__name__}.")
  out = []
  for index, message in enumerate(messages):
    if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
      raise ValueError(f"message {index} must be a dict with 'role' and 'content', got {message!r:.120}")
    if message["role"] == "system":
      raise ValueError(f"message {index} has role 'system'; pass the system text as render_chat("
                       "system=SystemTurn(text)) so the system turn stays explicit.")
    if not isinstance(message["content"], str):
      raise TypeError(f"message {index} content must be a str, got {type(message['content']).__name__}.")
    out.append({k: v for k, v in message.items() if v is not None})
  return out


# --- Jinja, as transformers sets it up -----------------------------------------------------------

class _GenerationBlock(jinja2.ext.Extension):
  """``{% generation %}...{% endgeneration %}`` (used by some templates): renders its body as is."""

  tags = {"generation"}

  def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

  def _render_body(self, caller: Any) -> str:
    return caller()


def _raise_exception(message: str) -> None:
  raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
  # As transformers: plain json.dumps (Jinja's own tojson escapes HTML characters).
  return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
  return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
  """The template compiled in the sandbox transformers uses, with the same filters and globals."""
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True,
      extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = _strftime_now
  return env.from_string(source)


# --- rendering -----------------------------------------------------------------------------------

class ChatTemplate:
  """One Jinja chat template with its special-token variables (``bos_token``, ...), rendered with
  the system turn under explicit control. ``where`` names the tokenizer in errors."""

  def __init__(self, source: str, variables: Mapping[str, str], where: str = "") -> None:
    self.source = source
    self._variables = dict(variables)
    self._where = where

  def render(self, messages: list[dict], *, system: SystemTurn, add_generation_prompt: bool) -> str:
    """``messages`` (checked by :func:`check_messages`) under the system turn ``system``."""
    if system.template_default:
      return self._render(messages, add_generation_prompt)
    if system.text is not None:
      return self._render([{"role": "system", "content": system.text}] + messages,
                          add_generation_prompt)
    return self._render_without_system(messages, add_generation_prompt)

  @property
  def default_system_block(self) -> str:
    """The text the template inserts when no system message is given ("" if it inserts none)."""
    return self._system_layout[1]

  def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
    # A template is data from a model file: whatever goes wrong in it (bad syntax, an undefined
    # name, an operation the sandbox forbids, runaway recursion) is that file's error, named.
    try:
      return _compile_template(self.source).render(
          messages=messages, tools=None, documents=None,
          add_generation_prompt=add_generation_prompt, **self._variables)
    except (jinja2.TemplateError, TypeError, ValueError, ArithmeticError, LookupError,
            AttributeError, RecursionError) as e:
      raise ValueError(f"the chat template of {self._where or 'this tokenizer'!r} cannot render "
                       f"this chat: {type(e).__name__}: {e}") from e

  @functools.cached_property
  def _system_layout(self) -> tuple[str, str, str | None, str | None]:
    """(lead-in, default system block, sentinel system block, folded separator) of this template.

    Found by construction from three probe renders: [system S], [system S, user U], [user U]. The
    user turn is what [system S, user U] adds after [system S]; what [user U] writes before that
    user turn is the default system block, unless it is also a prefix of [system S] (e.g. a BOS
    text written before every chat): then it is a lead-in kept in every rendering, and the
    template has no default.

    Templates that fold the system text into the first user turn (Gemma: "S\n\nU" inside one
    user turn; [system S] alone renders no S) give ``("", "", None, separator)``: with no default
    system text, [user U] is [system S, user U] with "S" + separator cut out.
    """
    system = {"role": "system", "content": _SENTINEL_SYSTEM}
    user = {"role": "user", "content": _SENTINEL_USER}
    try:
      system_only = self._render([system], False)
      system_user = self._render([system, user], False)
      user_only = self._render([user], False)
    except ValueError as e:
      raise ValueError(f"Cannot locate the system turn of the chat template of {self._where!r}: "
                       f"rendering a probe conversation failed: {e}") from e
    folded = _folded_system_separator(system_only, system_user, user_only)
    if folded is not None:
      return ("", "", None, folded)
    user_turn = system_user[len(system_only):]
    if (not system_user.startswith(system_only) or _SENTINEL_SYSTEM not in system_only
        or not user_turn or not user_only.endswith(user_turn)):
      raise ValueError(f"The chat template of {self._where!r} does not write the system turn as a "
                       "separate leading block; cannot render it without a system turn.")
    before_user = user_only[:len(user_only) - len(user_turn)]
    if system_only.startswith(before_user):
      return (before_user, "", system_only[len(before_user):], None)
    return ("", before_user, system_only, None)

  def _render_without_system(self, messages: list[dict], add_generation_prompt: bool) -> str:
    lead, default_block, sentinel_block, folded = self._system_layout
    rendered = self._render(messages, add_generation_prompt)
    if folded is not None:
      # Cross-check: a sentinel system text, folded in and then cut out, gives the same text.
      with_sentinel = self._render([{"role": "system", "content": _SENTINEL_SYSTEM}] + messages,
                                   add_generation_prompt)
      if with_sentinel.replace(_SENTINEL_SYSTEM + folded, "", 1) != rendered:
        raise ValueError("Rendering without a system turn is ambiguous for this chat template: the "
                         "system text is not folded into the first user turn the same way here.")
      return rendered
    if not rendered.startswith(lead + default_block):
      raise ValueError("The chat template's default system block does not lead the rendered chat;"
                       " cannot remove it.")
    rendered = lead + rendered[len(lead) + len(default_block):]
    # Cross-check by a second construction: a sentinel system turn, then that turn cut out.
    with_sentinel = self._render([{"role": "system", "content": _SENTINEL_SYSTEM}] + messages,
                                 add_generation_prompt)
    if (not with_sentinel.startswith(lead + sentinel_block)
        or lead + with_sentinel[len(lead) + len(sentinel_block):] != rendered):
      raise ValueError("Rendering without a system turn is ambiguous for this chat template: removing"
                       " the default block and removing an explicit system turn disagree.")
    return rendered


def _folded_system_separator(system_only: str, system_user: str, user_only: str) -> str | None:
  """The text between the system and the user text when a template folds the system text into the
  first user turn and has no default system text; None otherwise (see ``_system_layout``)."""
  if _SENTINEL_SYSTEM in system_only or _SENTINEL_SYSTEM not in system_user:
    return None
  start = system_user.index(_SENTINEL_SYSTEM)
  end = system_user.find(_SENTINEL_USER, start)
  if end < 0:
    return None
  separator = system_user[start + len(_SENTINEL_SYSTEM):end]
  if system_user[:start] + system_user[end:] != user_only:
    return None
  return separator
