"""Tool-call formats, one module each, every one with the same four sides: whether a chat template
can take tools in it (`template_problem`), what the template is given (`for_template`: the
messages, and the tools when the template renders them), the grammar that makes a reply's calls
valid for the request's tools (`grammar`), and the reply read back as content and OpenAI-shaped
calls (`parse`, and `stream` while streaming). Every dialect (Chat Completions, Responses, Messages)
uses the format its engine was given; none knows which it is.

- hermes: `<tool_call>{"name", "arguments"}</tool_call>` (Qwen2.5, SmolLM3, Hermes; SmolLM2 with
  billion's chatml-tools template): tools.py;
- llama3-json: `{"name": ..., "parameters": {...}}` as the whole reply, results in the `ipython`
  role (Llama 3.1-3.3, Llama 3.2-1B/3B-Instruct): llama3.py;
- mistral: `[TOOL_CALLS][{"name", "arguments"}]` (Mistral 7B v0.3, Nemo), results in
  [TOOL_RESULTS]: mistral.py;
- generic: for templates that render no tools (llama.cpp's idea): the tools described in a system
  message and the reply constrained to `{"tool_calls": [...]}` or `{"response": "..."}`: generic.py.

`detect` picks one from the model's chat template; `billion serve --tool-format` overrides it.
"""

from __future__ import annotations

from billion.server.tool_formats import generic, hermes, llama3, mistral

FORMATS = {"hermes": hermes, "llama3-json": llama3, "mistral": mistral, "generic": generic}


def detect(chat_template: str | None):
    """(the format module, why) for a model with this chat template."""
    template = chat_template or ""
    if not template:
        return generic, "the model has no chat template"
    if "tools" in template and hermes.CALL_START in template:
        return hermes, "its chat template writes <tool_call> tags"
    if "tools" in template and '"parameters"' in template and ("ipython" in template or "<|python_tag|>" in template):
        return llama3, "its chat template is Llama 3's (JSON calls, ipython results)"
    if "tools" in template and mistral.TRIGGER in template:
        return mistral, "its chat template is Mistral's ([TOOL_CALLS])"
    if "tools" in template:
        return generic, "its chat template renders tools in a format billion does not parse"
    return generic, "its chat template renders no tools"


def choose(chat_template: str | None, name: str = "auto"):
    """(format module, why): `name` ("auto": detected from the template)."""
    if name == "auto":
        return detect(chat_template)
    return FORMATS[name], "--tool-format"
