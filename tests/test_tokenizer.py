"""Tiny tokenizer asset, local-dir loading with fallbacks, and assistant-only loss masks."""
import json
import os

import numpy as np
import pytest

from feallm_jax.data import instructions, synthetic, tokenizer as T

CONV = [{"from": "human", "value": "<image>\nWhat is the facial expression?"},
        {"from": "gpt", "value": "Happiness."},
        {"from": "human", "value": "Which action units are active?"},
        {"from": "gpt", "value": "AU6 (cheek raiser), AU12 (lip corner puller)."}]


@pytest.fixture(scope="module")
def tok():
  return T.load()


def test_tiny_asset_is_complete_and_offline(tok):
  for f in ("tokenizer.json", "tokenizer_config.json", "config.json"):
    assert os.path.exists(os.path.join(T.TINY_DIR, f)), f
  with open(os.path.join(T.TINY_DIR, "tokenizer_config.json")) as f:
    assert "ASSISTANT:" in json.load(f)["chat_template"]
  from transformers import AutoTokenizer
  auto = AutoTokenizer.from_pretrained(T.TINY_DIR, local_files_only=True)
  assert auto.encode("<image>", add_special_tokens=False) == [T.image_token_id(tok)]
  assert 512 <= len(tok) <= 2048
  assert {tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token} == {
      "<s>", "</s>", "<pad>", "<unk>"}
  assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, T.image_token_id(tok)}) == 4


def test_vicuna_style_template(tok):
  text = tok.apply_chat_template(T.to_messages(CONV), tokenize=False)
  assert text == ("<s>USER: <image>\nWhat is the facial expression? ASSISTANT: Happiness.</s>"
                  "USER: Which action units are active? ASSISTANT: AU6 (cheek raiser), "
                  "AU12 (lip corner puller).</s>")


def test_loss_mask_covers_exactly_the_answers(tok):
  ids, mask = T.encode_conversation(tok, CONV)
  assert ids.dtype == np.int32 and mask.shape == ids.shape
  assert (ids == T.image_token_id(tok)).sum() == 1
  assert mask[ids == T.image_token_id(tok)].sum() == 0
  # Masked runs, decoded, are the two answers each followed by the end token.
  runs, cur = [], []
  for i, m in zip(ids, mask):
    if m:
      cur.append(int(i))
    elif cur:
      runs.append(cur)
      cur = []
  if cur:
    runs.append(cur)
  assert [tok.decode(r).strip() for r in runs] == [
      "Happiness.</s>", "AU6 (cheek raiser), AU12 (lip corner puller).</s>"]


def test_prompt_ends_with_generation_prompt(tok):
  ids, ref, prompt = T.encode_prompt(tok, CONV)
  assert ref == CONV[-1]["value"]
  assert tok.decode(ids).endswith("Which action units are active? ASSISTANT:")
  assert len(prompt) == 3


def test_instruction_text_is_compact(tok):
  """Trained on the instruction text: a long reasoning answer stays well under max_len=128."""
  rec = synthetic.generate(3)
  for task in instructions.available_tasks(rec):
    ids, mask = T.encode_conversation(tok, instructions.make_conversation(rec, task, 1))
    assert len(ids) < 100, (task, len(ids))
    assert mask.sum() > 0
  assert tok.unk_token_id not in T.encode_conversation(tok, CONV)[0]


def test_local_dir_without_image_token_or_template(tmp_path):
  """A real-LLM-like dir: <image> gets added as one special token, Vicuna template fallback."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  raw = Tokenizer(models.BPE())
  raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  raw.decoder = decoders.ByteLevel()
  raw.train_from_iterator(["hello world, a face with a smile"] * 5, trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                          unk_token="<unk>").save_pretrained(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
  tok = T.load(str(tmp_path))
  assert tok.encode("a <image> b", add_special_tokens=False).count(T.image_token_id(tok)) == 1
  assert tok.pad_token is not None
  text = tok.apply_chat_template(T.to_messages(CONV[:2]), tokenize=False)
  assert text.startswith("<s>" + T.VICUNA_SYSTEM + " USER: <image>")
  ids, mask = T.encode_conversation(tok, CONV)
  assert tok.decode(ids[mask == 1]).endswith("</s>")


def test_missing_dir_is_a_clear_error():
  with pytest.raises(FileNotFoundError, match="does not exist"):
    T.load("/nonexistent/tokenizer")
