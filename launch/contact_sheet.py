"""A contact sheet of the synthetic faces, for human review: one face per emotion (contempt
included) at 256 px and at 64 px, its emotion and active AUs written underneath.

  python launch/contact_sheet.py [--out=runs/review/contact_sheet.png]
"""
import os

from absl import app, flags

FLAGS = flags.FLAGS


def _define_flags():
  """Defined when run as a script only: importing `contact_sheet()` (the test does) must not
  claim `--out` in the process-wide flag registry other launchers share."""
  flags.DEFINE_string("out", "runs/review/contact_sheet.png", "Where the PNG goes.")

TILE_W, TILE_H, BIG, SMALL = 256, 330, 256, 64


def contact_sheet():
  """(sheet PIL image, [(emotion, record index, active AUs)] in tile order, 4 tiles a row)."""
  from PIL import Image, ImageDraw
  from feallm_jax.data import facs, synthetic
  tiles, picked = [], []
  for e in facs.EMOTIONS:
    i = next(i for i in range(256)
             if facs.EMOTIONS[int(synthetic.generate(i, emotions=facs.EMOTIONS)["emotion"])] == e)
    r = synthetic.generate(i, emotions=facs.EMOTIONS)
    tile = Image.new("RGB", (TILE_W, TILE_H), "white")
    tile.paste(Image.fromarray(r["image"]).resize((BIG, BIG), Image.LANCZOS), (0, 0))
    tile.paste(Image.fromarray(r["image"]).resize((SMALL, SMALL), Image.BILINEAR),
               (TILE_W - SMALL, BIG + 6))
    aus = synthetic.active_aus(r)
    line = " ".join(f"AU{a}" for a in aus) or "no AUs"
    d = ImageDraw.Draw(tile)
    d.text((4, BIG + 6), e, fill="black")
    d.text((4, BIG + 24), line[:30], fill="black")
    d.text((4, BIG + 40), line[30:], fill="black")
    tiles.append(tile)
    picked.append((e, i, list(aus)))
  sheet = Image.new("RGB", (TILE_W * 4, TILE_H * ((len(tiles) + 3) // 4)), "white")
  for j, t in enumerate(tiles):
    sheet.paste(t, ((j % 4) * TILE_W, (j // 4) * TILE_H))
  return sheet, picked


def main(argv):
  del argv
  sheet, picked = contact_sheet()
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  sheet.save(FLAGS.out)
  for e, i, aus in picked:
    print(f"{e:<10s} record {i:3d}  AUs {aus}")
  print(f"saved {FLAGS.out}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
