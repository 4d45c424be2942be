"""Build one dataset as ArrayRecord under --data_dir (tfds), then print what was written/skipped.

  python launch/build_dataset.py --dataset=synthetic_fea --data_dir=runs/data
  python launch/build_dataset.py --dataset=raf_db --data_dir=runs/data --manual_dir=~/RAF-DB
  python launch/build_dataset.py --dataset=synthetic_fea --config=default --num_train=1000
"""
import json
import logging

from absl import app, flags

from feallm_jax.data import builders

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
flags.mark_flag_as_required("dataset")


def main(argv):
  del argv
  logging.getLogger("feallm_jax").setLevel(logging.INFO)
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
  print(json.dumps(summary))


if __name__ == "__main__":
  app.run(main)
