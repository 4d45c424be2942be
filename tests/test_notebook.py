"""The Colab quickstart notebook runs end to end (at a tiny size) and shows what it promises."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
  # The kernel inherits this environment (8 virtual devices from conftest, tiny sizes).
  for key, value in dict(FEALLM_NB_WORKDIR=str(tmp_path / "nb"), FEALLM_NB_TRAIN="48",
                         FEALLM_NB_TEST="8", FEALLM_NB_STEPS="3", FEALLM_NB_BATCH="8",
                         FEALLM_NB_PRETRAIN_STEPS="3").items():
    monkeypatch.setenv(key, value)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = NotebookClient(nb, timeout=900, kernel_name="python3",
                          resources={"metadata": {"path": ROOT}})
  client.execute()

  def outputs_of(marker):
    cell = next(c for c in nb.cells if c.cell_type == "code" and marker in c.source)
    return cell.get("outputs", [])

  def has_image(outs):
    return any("image/png" in o.get("data", {}) for o in outs)

  assert has_image(outputs_of("regions.canonical_boxes()")), "faces with regions not shown"
  assert has_image(outputs_of("training loss")), "loss curve not shown"
  assert has_image(outputs_of("explain.draw_overlay")), "region-attention overlay not shown"
  table = "".join(o.get("data", {}).get("text/markdown", "")
                  for o in outputs_of("report.markdown"))
  assert "| synthetic_fea |" in table and "fer" in table, table
  assert os.path.isdir(tmp_path / "nb" / "checkpoints")
  # Both stages ran: stage 0 wrote a base checkpoint that stage 1 loaded (small towers).
  assert os.path.isfile(tmp_path / "nb" / "base" / "stage0.json")
  assert "[stage0] vision (CLIP) 3/3" in "".join(
      o.get("text", "") for o in outputs_of("stage0.pretrain_backbones"))
  # ... and adapter alignment ran on them, and stage 1 started from its output.
  assert os.path.isfile(tmp_path / "nb" / "adapter" / "adapter.json")
  assert "adapter (alignment) 3/3" in "".join(
      o.get("text", "") for o in outputs_of("align.align_adapter"))


def test_notebook_install_cell_names_what_is_missing(tmp_path, monkeypatch):
  """Outside a checkout, and on Colab without FEALLM_REPO, the first cell says what to set."""
  nb = nbformat.read(NOTEBOOK, as_version=4)
  src = next(c.source for c in nb.cells if c.cell_type == "code")
  assert "github.com/feallm-jax" not in src          # no made-up address
  monkeypatch.delenv("FEALLM_REPO", raising=False)
  env = {"__name__": "__nb__"}
  cwd = os.getcwd()
  try:
    os.chdir(tmp_path)
    with pytest.raises(RuntimeError, match="checkout"):
      exec(compile(src, "install-cell", "exec"), env)
    import sys
    sys.modules["google.colab"] = type(sys)("google.colab")
    try:
      with pytest.raises(RuntimeError, match="FEALLM_REPO"):
        exec(compile(src, "install-cell", "exec"), {"__name__": "__nb__"})
    finally:
      del sys.modules["google.colab"]
  finally:
    os.chdir(cwd)
