"""notebooks/quickstart.ipynb runs top to bottom (tiny settings) and shows its table and plots."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("FEATUREPIPE_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        filter(None, [str(NOTEBOOK.parents[1]), os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
        "commit the notebook without outputs"
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error

    texts = "\n".join(out.get("text", "") for c in nb.cells if c.cell_type == "code"
                      for out in c.outputs if out.output_type == "stream")
    assert "| arm | accuracy | macro_f1 |" in texts  # the comparison table was printed
    assert "pixels+logreg" in texts and "finetune-head" in texts
    images = [out for c in nb.cells if c.cell_type == "code" for out in c.outputs
              if "image/png" in out.get("data", {})]
    assert len(images) == 2  # accuracy-vs-time and the learning curve
    out = tmp_path / "quickstart-out"
    assert (out / "compare" / "compare.png").exists()
    assert (out / "compare" / "learning_curve.png").exists()
    assert (out / "digits.h5").exists()
