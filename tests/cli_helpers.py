"""The launch/ scripts as modules, for tests that call their main() in-process, and the flags of
the tiny model that subprocess tests hand to launch/train.py."""
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_cli(script: str):
  """``launch/<script>.py``, loaded once per session (absl flags can be defined only once), with
  its flags back at their defaults (a previous test's values do not leak into the next parse)."""
  name = f"_launch_cli_{script}"
  mod = sys.modules.get(name)
  if mod is None:
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "launch",
                                                                     f"{script}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
  mod.FLAGS.unparse_flags()
  return mod


def tiny_train_flags(data_dir: str) -> list[str]:
  """`--config=...` flags for a seconds-long run of launch/train.py on the 'small' synthetic set:
  the tiny_synthetic config shrunk to a 2-layer MLP-projector model with no base checkpoint."""
  return ["--config=" + os.path.join(ROOT, "configs", "tiny_synthetic.py"),
          f"--config.data.data_dir={data_dir}", "--config.data.builder_config=small",
          "--config.data.batch_size=8", "--config.data.augment=False",
          "--config.data.max_len=96", "--config.model.base_checkpoint=",
          "--config.model.init_adapter=",
          "--config.model.vision.hidden_size=64", "--config.model.vision.intermediate_size=128",
          "--config.model.vision.num_layers=2", "--config.model.vision.num_heads=2",
          "--config.model.llm.hidden_size=64", "--config.model.llm.intermediate_size=128",
          "--config.model.llm.num_layers=2", "--config.model.llm.num_heads=2",
          "--config.model.llm.num_kv_heads=1", "--config.model.llm.head_dim=32",
          "--config.model.multi_layers=(1,2)", "--config.model.projector=mlp",
          "--config.model.local_clues=False", "--config.model.lora.dropout=0.0"]
