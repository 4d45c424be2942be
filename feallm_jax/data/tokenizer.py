"""Tokenizers: the tiny shipped one, or a real LLM's (LLaMA/Vicuna, Qwen2) from a local dir.

Every tokenizer leaves here with "<image>" as one special token, a pad token and a chat template,
so the pipeline treats the tiny and the real models alike. Loss masks come from rendering the
template turn by turn (prefix renders give each assistant span), which works for any template
whose renders are prefix-consistent (Vicuna, ChatML) and needs no `{% generation %}` markers.
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np
# Imported here, not lazily: transformers' lazy module is not thread-safe, and Grain maps run
# in threads.
from transformers import AutoTokenizer

IMAGE_TOKEN = "<image>"
TINY_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "tokenizer_tiny")

# Vicuna v1.1 / LLaVA-1.5 conversation format: "<s>{system} USER: {q} ASSISTANT: {a}</s>USER: ..."
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's "
                 "questions.")
_VICUNA_BODY = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{{ messages[0]['content'] + ' ' }}"
    "{%- set msgs = messages[1:] -%}"
    "{%- else -%}{{ DEFAULT_SYSTEM }}{%- set msgs = messages -%}{%- endif -%}"
    "{%- for m in msgs -%}"
    "{%- if m['role'] == 'user' -%}{{ 'USER: ' + m['content'] + ' ' }}"
    "{%- elif m['role'] == 'assistant' -%}{{ 'ASSISTANT: ' + m['content'] + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}")
# The tiny model has no use for a 35-token system prompt; real Vicuna checkpoints expect it.
TINY_CHAT_TEMPLATE = _VICUNA_BODY.replace("{{ DEFAULT_SYSTEM }}", "")
VICUNA_CHAT_TEMPLATE = _VICUNA_BODY.replace("{{ DEFAULT_SYSTEM }}",
                                             "{{ '" + VICUNA_SYSTEM.replace("'", "\\'") + " ' }}")

_ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "system": "system"}


def load(path: str = ""):
  """A fast tokenizer with <image>, a pad token and a chat template ('' = the tiny one)."""
  src = path or TINY_DIR
  if not os.path.isdir(src):
    raise FileNotFoundError(f"tokenizer dir {src!r} does not exist (nothing is downloaded)")
  tok = AutoTokenizer.from_pretrained(src, local_files_only=True, use_fast=True)
  if not getattr(tok, "is_fast", False):
    raise ValueError(f"{src}: need a fast tokenizer (tokenizer.json) for offset mappings")
  if IMAGE_TOKEN not in tok.get_vocab():
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]},
                           replace_extra_special_tokens=False)
  elif IMAGE_TOKEN not in tok.all_special_tokens:
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]},
                           replace_extra_special_tokens=False)
  if tok.pad_token is None:
    tok.pad_token = tok.unk_token or tok.eos_token
  if not tok.chat_template:
    tok.chat_template = VICUNA_CHAT_TEMPLATE
  ids = tok.encode(IMAGE_TOKEN, add_special_tokens=False)
  if len(ids) != 1:
    raise ValueError(f"{src}: {IMAGE_TOKEN!r} tokenizes to {ids}, expected one id")
  return tok


def image_token_id(tok) -> int:
  return int(tok.convert_tokens_to_ids(IMAGE_TOKEN))


def to_messages(conversation: Sequence[dict[str, Any]] | str) -> list[dict[str, str]]:
  """LLaVA turns ({'from': 'human'|'gpt', 'value'}) or chat messages -> chat messages."""
  if isinstance(conversation, str):
    conversation = json.loads(conversation)
  out = []
  for t in conversation:
    role = t.get("role") or t.get("from")
    if role not in _ROLE:
      raise ValueError(f"unknown conversation role {role!r} in {t!r}")
    out.append({"role": _ROLE[role], "content": t.get("content", t.get("value", ""))})
  return out


def _render(tok, messages, generation_prompt: bool) -> str:
  return tok.apply_chat_template(messages, tokenize=False,
                                 add_generation_prompt=generation_prompt)


def encode_conversation(tok, conversation) -> tuple[np.ndarray, np.ndarray]:
  """(input_ids int32 [T], loss_mask int32 [T]): loss on assistant answers and their end token."""
  msgs = to_messages(conversation)
  text = _render(tok, msgs, False)
  spans = []
  for k, m in enumerate(msgs):
    if m["role"] != "assistant":
      continue
    start = len(_render(tok, msgs[:k], True))
    end = len(_render(tok, msgs[: k + 1], False))
    if text[:end] != _render(tok, msgs[: k + 1], False):
      raise ValueError("chat template renders are not prefix-consistent; cannot mask turns")
    spans.append((start, end))
  enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
  ids = np.asarray(enc["input_ids"], np.int32)
  offs = np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)
  mask = np.zeros(len(ids), np.int32)
  for s, e in spans:
    # A token belongs to the answer when it starts inside the span (leading space included).
    mask |= ((offs[:, 0] >= s) & (offs[:, 0] < e) & (offs[:, 1] > offs[:, 0])).astype(np.int32)
  return ids, mask


def encode_prompt(tok, conversation) -> tuple[np.ndarray, str, list[dict[str, str]]]:
  """Prompt ids up to the last assistant turn (with the generation prompt), and its reference.

  Returns (input_ids int32 [T], reference answer, prompt messages).
  """
  msgs = to_messages(conversation)
  last = max((k for k, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
  if last is None:
    prompt, ref = msgs, ""
  else:
    prompt, ref = msgs[:last], msgs[last]["content"]
  text = _render(tok, prompt, True)
  ids = np.asarray(tok(text, add_special_tokens=False)["input_ids"], np.int32)
  return ids, ref, prompt
