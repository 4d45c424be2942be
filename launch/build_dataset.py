"""Build one dataset as ArrayRecord under --data_dir (tfds), then print what was written/skipped
and, per split, the token lengths its examples have for a training config (and how many would
not fit that config's ``data.max_len``).

  python launch/build_dataset.py --dataset=synthetic_fea --data_dir=runs/data
  python launch/build_dataset.py --dataset=raf_db --data_dir=runs/data --manual_dir=~/RAF-DB
  python launch/build_dataset.py --dataset=synthetic_fea --config=default --num_train=1000
  python -m launch.build_dataset --dataset=synthetic_fea --data_dir=gs://bucket/tfds  # built in
      $TMPDIR, then copied up (ArrayRecord writes local files only; it reads gs:// itself)
  python launch/build_dataset.py --dataset=disfa --data_dir=runs/data --manual_dir=~/DISFA \\
      --frame_base=0          # frames extracted from 0 (ME-GraphAU, PyTorch-JAANet); auto detects
  python launch/build_dataset.py --dataset=llava_instruct --data_dir=/data/tfds \\
      --manual_dir=/data/FABAInstruct --train_config=configs/llava7b_lora.py \\
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
flags.DEFINE_string("data_dir", "runs/data", "tfds data_dir the ArrayRecord files go to (a "
                    "local folder or gs://bucket/...).")
flags.DEFINE_string("manual_dir", None, "Folder with the manually downloaded files.")
flags.DEFINE_string("config", None, "Builder config (default: the builder's first).")
flags.DEFINE_integer("num_train", None, "synthetic_fea: train size override.")
flags.DEFINE_integer("num_validation", None, "synthetic_fea: validation size override.")
flags.DEFINE_integer("num_test", None, "synthetic_fea: test size override.")
flags.DEFINE_integer("frame_stride", None, "bp4d/disfa: keep every n-th frame.")
flags.DEFINE_enum("frame_base", None, ["auto", "0", "1"],
                  "disfa: number of the image file holding the video's first frame (label frame "
                  "1): 0 for ME-GraphAU / PyTorch-JAANet extractions, 1 for ffmpeg's default "
                  "(LibreFace). Default auto: detected per subject; the build stops when the "
                  "files do not tell.")
flags.DEFINE_string("image_root", None,
                    "disfa/bp4d: the folder of per-subject frame folders when it is not "
                    "<manual_dir>/Images|images|img|...; llava_instruct: the folder the JSON "
                    "image paths are relative to (EmoLA's FABAInstruct: the data/ folder above "
                    "it; found by itself when it is manual_dir's parent).")
flags.DEFINE_string("default_split", None,
                    "llava_instruct: split of JSON files whose path names none (e.g. "
                    "llava_v1_5_mix665k.json); default train.")
flags.DEFINE_bool("skip_occluded", None,
                  "bp4d: leave out frames the AU_OCC occlusion column marks (OpenFace's reading); "
                  "default keeps them (ME-GraphAU keeps every labelled frame) and counts them.")
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
               ("num_train", "num_validation", "num_test", "frame_stride", "frame_base",
                "skip_occluded")
               if getattr(FLAGS, k) is not None}
  if overrides.get("frame_base") == "auto":   # the default: the config keeps its own name
    del overrides["frame_base"]
  kwargs = {k: getattr(FLAGS, k) for k in ("image_root", "default_split")
            if getattr(FLAGS, k) is not None}
  summary = builders.build(FLAGS.dataset, FLAGS.data_dir, config=FLAGS.config,
                           manual_dir=FLAGS.manual_dir, overrides=overrides or None,
                           overwrite=FLAGS.overwrite, **kwargs)
  state = "reused existing" if summary["reused"] else "wrote"
  print(f"{state} {summary['name']}/{summary['config']} at {summary['path']} "
        f"in {summary['seconds']} s")
  for split, n in summary["splits"].items():
    skipped = summary["skipped"].get(split, {})
    extra = f", skipped {skipped}" if skipped else ""
    noted = summary["noted"].get(split, {})
    extra += f", kept and counted {noted}" if noted else ""
    print(f"  {split}: {n} examples{extra}")
  if "all" in summary["skipped"]:
    print(f"  before splitting: skipped {summary['skipped']['all']}")
  if "all" in summary["noted"]:
    print(f"  before splitting: counted {summary['noted']['all']}")
  for split, first in summary["skipped_first"].items():
    for reason, msg in first.items():
      print(f"  first skipped [{split}/{reason}]: {msg}")
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
