"""Train the tiny tokenizer shipped in feallm_jax/assets/tokenizer_tiny (offline, deterministic).

Byte-level BPE (no unknown tokens, any text round-trips) over the text the tiny model ever sees:
the instruction prompts and answers of data/instructions.py for many sampled label sets, the
FACS vocabulary of data/facs.py and the Vicuna chat scaffolding. A vocab of ~1.5k keeps the
embedding and the logits of the tiny LLM small while common words stay single tokens.

  python -m feallm_jax.data.train_tokenizer [--out DIR] [--vocab_size 1024] [--records 3000]
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

from feallm_jax.data import facs, tokenizer

SPECIAL = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def _fake_record(rng: np.random.Generator, index: int) -> dict:
  """Labels as a builder would yield them, without rendering the image (text only)."""
  from feallm_jax.data import synthetic
  emotion = facs.EMOTIONS[int(rng.integers(len(facs.EMOTIONS)))]
  aus = synthetic.sample_expression(rng, emotion)
  inten = np.zeros(len(facs.ALL_AUS), np.float32)
  for au, v in aus.items():
    inten[facs.au_index(au)] = v
  pres = (inten >= 1.0).astype(np.int32)
  kind = index % 4   # vary which labels exist, as across datasets
  return dict(
      id=f"tok-{index}", image=None, landmarks=np.zeros((68, 2), np.float32),
      has_landmarks=False,
      emotion=np.int32(facs.emotion_index(emotion) if kind != 2 else -1),
      au_present=pres if kind != 1 else np.full_like(pres, -1),
      au_intensity=inten if kind == 0 else np.full_like(inten, -1.0),
      subject="", conversations="")


def _chat_text(conv) -> str:
  """A conversation as the tiny template renders it, specials removed (they are added tokens)."""
  text = "".join(("USER: " if t["from"] == "human" else "ASSISTANT: ") + t["value"] + " "
                 for t in conv)
  return text.replace(tokenizer.IMAGE_TOKEN, "")


def corpus(num_records: int, seed: int = 0) -> list[str]:
  """Every line of training text (deterministic)."""
  lines = [tokenizer.VICUNA_SYSTEM, "USER: ASSISTANT:"]
  for au in facs.ALL_AUS:
    name, muscle = facs.AU_TABLE[au]
    lines += [f"AU{au} {name}", f"AU{au} ({name}) is produced by the {muscle}.", name.title()]
  lines += list(facs.EMOTION_SYNONYMS) + [e.title() for e in facs.EMOTIONS]
  lines += list(facs.AU_ALIASES)
  rng = np.random.default_rng(seed)
  try:
    from feallm_jax.data import instructions
  except ImportError:   # bootstrapping before instructions.py exists: label sentences only
    instructions = None
  for i in range(num_records):
    rec = _fake_record(rng, i)
    if instructions is None:
      aus = [au for au, p in zip(facs.ALL_AUS, rec["au_present"]) if p == 1]
      emo = facs.EMOTIONS[int(rec["emotion"])] if rec["emotion"] >= 0 else "neutral"
      lines.append(_chat_text([
          {"from": "human", "value": "<image>\nWhat is the facial expression?"},
          {"from": "gpt", "value": f"The expression is {emo}."},
          {"from": "human", "value": "Which action units are active?"},
          {"from": "gpt", "value": ", ".join(f"AU{a} ({facs.au_name(a)})" for a in aus) + "."}]))
      continue
    for task in instructions.available_tasks(rec):
      conv = instructions.make_conversation(rec, task, int(rng.integers(1 << 31)))
      lines.append(_chat_text(conv))
  return lines


def train(out: str, *, vocab_size: int = 1024, num_records: int = 3000, seed: int = 0) -> str:
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  specials = list(SPECIAL.values()) + [tokenizer.IMAGE_TOKEN]
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, min_frequency=1, special_tokens=specials, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(corpus(num_records, seed), trainer)
  fast = PreTrainedTokenizerFast(
      tokenizer_object=tok, additional_special_tokens=[tokenizer.IMAGE_TOKEN],
      chat_template=tokenizer.TINY_CHAT_TEMPLATE, model_max_length=2048,
      padding_side="right", clean_up_tokenization_spaces=False, **SPECIAL)
  os.makedirs(out, exist_ok=True)
  fast.save_pretrained(out)
  # transformers 5 writes the template to chat_template.jinja; keep it in tokenizer_config.json
  # too, where older readers (and people) look for it.
  cfg_path = os.path.join(out, "tokenizer_config.json")
  with open(cfg_path) as f:
    cfg = json.load(f)
  cfg["chat_template"] = tokenizer.TINY_CHAT_TEMPLATE
  with open(cfg_path, "w") as f:
    json.dump(cfg, f, indent=2)
  # AutoTokenizer wants a config.json offline; this one only names the family.
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump({"model_type": "llama", "vocab_size": len(fast),
               "bos_token_id": fast.bos_token_id, "eos_token_id": fast.eos_token_id,
               "pad_token_id": fast.pad_token_id}, f, indent=2)
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=tokenizer.TINY_DIR)
  p.add_argument("--vocab_size", type=int, default=1024)
  p.add_argument("--records", type=int, default=3000)
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args(argv)
  out = train(a.out, vocab_size=a.vocab_size, num_records=a.records, seed=a.seed)
  tok = tokenizer.load(out)
  print(json.dumps({"out": out, "vocab_size": len(tok),
                    "image_token_id": tokenizer.image_token_id(tok)}))


if __name__ == "__main__":
  main()
