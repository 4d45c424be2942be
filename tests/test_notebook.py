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
                         FEALLM_NB_TEST="8", FEALLM_NB_STEPS="3", FEALLM_NB_BATCH="8").items():
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
