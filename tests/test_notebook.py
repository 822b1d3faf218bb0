"""The analysis notebook runs top to bottom on a tiny evaluation (nbclient, kernel python3)."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from polypsam.data.demo import generate_demo_dataset
from polypsam.evaluation import EvalSettings, evaluate_model
from polypsam.models import build_model

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "analysis.ipynb"


@pytest.fixture
def tiny_eval_dir(tmp_path) -> Path:
    root = generate_demo_dataset(tmp_path / "demo", n_train=2, n_test=3, size=(97, 131))
    out = tmp_path / "eval"
    net = build_model("tiny", pretrained=False)
    evaluate_model(net, root, out, EvalSettings(noise=(0.0, 0.1)), verbose=False)
    return out


@pytest.mark.slow  # a subprocess or a training run
def test_analysis_notebook_executes(tiny_eval_dir, monkeypatch):
    monkeypatch.setenv("POLYPSAM_EVAL_DIR", str(tiny_eval_dir))
    monkeypatch.setenv("PYTHONPATH", str(REPO / "src"))  # the kernel is a subprocess of this environment
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, kernel_name="python3", timeout=300,
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(o.get("text", "") for o in outputs)
    assert "tiny zero-shot: 6 images" in text and str(tiny_eval_dir) in text
    markdown = "\n".join(o["data"].get("text/markdown", "") for o in outputs if "data" in o)
    assert "| **tiny zero-shot (ours, per-image Dice/IoU @0.5)** |" in markdown  # the table
    assert "| box noise (fraction of box side) |" in markdown  # the robustness table
    html = "\n".join(o["data"].get("text/html", "") for o in outputs if "data" in o)
    assert "synthetic_" in html  # the worst-cases listing
    pngs = [o for o in outputs if "data" in o and "image/png" in o["data"]]
    assert len(pngs) == 2  # worst cases and the robustness curve
