"""Small real models for the runtime tests.

Models are built with the runtime venv's own Python so that the library versions that
write them are the ones that load them.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.servers.venvs import ensure_venv

#: rows of iris measurements (sepal length, sepal width, petal length, petal width),
#: one clear case per class, and the class index every sane classifier predicts
IRIS_SAMPLE: tuple[tuple[float, float, float, float], ...] = (
    (5.1, 3.5, 1.4, 0.2),
    (5.9, 2.8, 4.3, 1.3),
    (7.2, 3.2, 6.0, 1.8),
)
IRIS_EXPECTED: tuple[int, ...] = (0, 1, 2)

#: the file name MLServer's sklearn runtime looks for in a model directory
SKLEARN_MODEL_FILE = "model.joblib"

_TRAIN_SKLEARN = """
import sys
import joblib
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

features, labels = load_iris(return_X_y=True)
model = LogisticRegression(max_iter=1000, random_state=0).fit(features, labels)
sample = [list(map(float, row.split(","))) for row in sys.argv[2].split(";")]
predicted = [int(p) for p in model.predict(sample)]
expected = [int(e) for e in sys.argv[3].split(",")]
if predicted != expected:
    sys.exit(f"trained model predicts {predicted} for the sample, expected {expected}")
joblib.dump(model, sys.argv[1])
"""


def make_sklearn_model(dest: Path) -> Path:
    """Train a LogisticRegression on the iris data set and write it to
    ``dest/model.joblib``; return ``dest``.

    The model predicts :data:`IRIS_EXPECTED` for :data:`IRIS_SAMPLE` (checked before
    it is written). ``dest`` is created when missing and holds nothing else.
    """
    dest.mkdir(parents=True, exist_ok=True)
    python = ensure_venv("mlserver") / "bin" / "python"
    sample = ";".join(",".join(str(v) for v in row) for row in IRIS_SAMPLE)
    expected = ",".join(str(e) for e in IRIS_EXPECTED)
    subprocess.run(
        [str(python), "-c", _TRAIN_SKLEARN, str(dest / SKLEARN_MODEL_FILE), sample, expected],
        check=True,
        timeout=120,
        cwd=dest,
    )
    return dest


def make_broken_model(dest: Path) -> Path:
    """Write ``dest/model.joblib`` holding bytes that are no pickle at all, so that
    MLServer's sklearn runtime fails to load it; return ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / SKLEARN_MODEL_FILE).write_bytes(b"\x00 this is not a joblib file\n")
    return dest
