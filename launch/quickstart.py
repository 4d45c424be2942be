"""`make quickstart`: build synthetic_fea, train tiny_synthetic, evaluate FEABench, print results."""

from absl import app, flags

flags.DEFINE_string("workdir", "runs/quickstart", "Where data, checkpoints and results go.")


def main(argv):
  del argv
  print("quickstart: the main job is not wired yet (see the open quickstart issue).")


if __name__ == "__main__":
  app.run(main)
