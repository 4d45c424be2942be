"""Build one dataset as ArrayRecord under --data_dir (tfds), then print what was written/skipped
and, per split, the token lengths its examples have for a training config (and how many would
not fit that config's ``data.max_len``).

  python launch/build_dataset.py --dataset=synthetic_fea --data_dir=runs/data
  python launch/build_dataset.py --dataset=raf_db --data_dir=runs/data --manual_dir=~/RAF-DB
  python launch/build_dataset.py --dataset=synthetic_fea --config=default --num_train=1000
  python launch/build_dataset.py --dataset=llava_instruct --data_dir=/data/tfds \\
      --manual_dir=/data/FABA-Instruct --train_config=configs/llava7b_lora.py \\
      --train_config.data.tokenizer=/ckpt/vicuna-7b-v1.5 --train_config.data.max_len=2048
"""
import json
import os

from absl import app, flags
from ml_collections import config_flags

from feallm_jax.data import builders

# The repository root, where configs/ lives (used as a file path only).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLAGS = flags.FLAGS
flags.DEFINE_enum("dataset", None, sorted(builders.BUILDERS), "Dataset to build.")
flags.DEFINE_string("data_dir", "runs/data", "tfds data_dir the ArrayRecord files go to.")
flags.DEFINE_string("manual_dir", None, "Folder with the manually downloaded files.")
flags.DEFINE_string("config", None, "Builder config (default: the builder's first).")
flags.DEFINE_integer("num_train", None, "synthetic_fea: train size override.")
flags.DEFINE_integer("num_validation", None, "synthetic_fea: validation size override.")
flags.DEFINE_integer("num_test", None, "synthetic_fea: test size override.")
flags.DEFINE_integer("frame_stride", None, "bp4d/disfa: keep every n-th frame.")
flags.DEFINE_bool("overwrite", False, "Rebuild even if the dataset exists.")
config_flags.DEFINE_config_file(
    "train_config", os.path.join(ROOT, "configs", "tiny_synthetic.py"),
    "Training config whose tokenizer, visual-token count and data.max_len the length report "
    "uses (overrides: --train_config.data.max_len=...).", lock_config=True)
flags.DEFINE_integer("report_examples", 10000,
                     "Examples per split the length report reads (evenly spaced); 0 = all.")
flags.mark_flag_as_required("dataset")


def length_lines(report: dict) -> list[str]:
  """The length report of one split as text."""
  t = report["text_tokens"]
  if not t:
    return ["    no examples"]
  pct = lambda d: " ".join(f"{k} {v:g}" for k, v in d.items())  # noqa: E731
  lines = [f"    text tokens: {pct(t)}"]
  if "llm_tokens" in report:
    lines.append(f"    LLM sequence ({report['visual_tokens']} visual tokens for the <image>): "
                 f"{pct(report['llm_tokens'])}")
  n, of = report["examples"], report["of"]
  head = f"    of {n}{'' if n == of else f' sampled (of {of})'} examples at max_len " \
         f"{report['max_len']}: {report['truncated']} would be truncated"
  if report["dropped"]:
    by = ", ".join(f"{c} {r}" for r, c in report["dropped_by_reason"].items())
    lines.append(f"{head}, {report['dropped']} would be dropped ({by})")
    lines.append(f"    {report['describe']}")
  else:
    lines.append(f"{head}, none would be dropped")
  if report["fits_untruncated"] > report["max_len"]:
    lines.append(f"    max_len {report['fits_untruncated']} would fit every one untruncated")
  return lines


def main(argv):
  del argv
  from feallm_jax import console
  console.setup()   # per-split lines and warnings; --verbosity=0 adds tfds' own output
  overrides = {k: getattr(FLAGS, k) for k in
               ("num_train", "num_validation", "num_test", "frame_stride")
               if getattr(FLAGS, k) is not None}
  summary = builders.build(FLAGS.dataset, FLAGS.data_dir, config=FLAGS.config,
                           manual_dir=FLAGS.manual_dir, overrides=overrides or None,
                           overwrite=FLAGS.overwrite)
  state = "reused existing" if summary["reused"] else "wrote"
  print(f"{state} {summary['name']}/{summary['config']} at {summary['path']} "
        f"in {summary['seconds']} s")
  for split, n in summary["splits"].items():
    skipped = summary["skipped"].get(split, {})
    extra = f", skipped {skipped}" if skipped else ""
    print(f"  {split}: {n} examples{extra}")
  if "all" in summary["skipped"]:
    print(f"  before splitting: skipped {summary['skipped']['all']}")
  tc = FLAGS.train_config
  if tc is not None:
    import tensorflow_datasets as tfds

    from feallm_jax.data import pipeline
    b = builders.make_builder(FLAGS.dataset, FLAGS.data_dir, config=summary["config"])
    print(f"token lengths with config {tc.get('name', '')!r} (tokenizer "
          f"{tc.data.tokenizer or 'tiny'}, max_len {tc.data.max_len}; change with "
          "--train_config=... / --train_config.data.tokenizer / --train_config.data.max_len):")
    summary["lengths"] = {}
    for split in summary["splits"]:
      src = b.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
      report = pipeline.length_report(tc, src, num_examples=FLAGS.report_examples)
      summary["lengths"][split] = report
      print(f"  {split}:")
      print("\n".join(length_lines(report)))
  print(json.dumps(summary))


if __name__ == "__main__":
  app.run(main)
