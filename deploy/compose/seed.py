"""Write the compose stack's sample models into the S3 store's folder.

The store (``rclone serve s3 /data``) serves every folder under ``/data`` as a bucket
and every file as an object, so seeding is writing files:

    python seed.py sklearn /data/models   ->  s3://models/sklearn/iris/model.joblib
    python seed.py triton /data/models    ->  s3://models/triton/squarer/{config.pbtxt,1/model.py}

``sklearn`` trains a small classifier on the iris data that scikit-learn ships, so it
needs scikit-learn and joblib: the compose file runs it inside the MLServer image, whose
scikit-learn is the one that will load the model. It checks the trained model's answers
for the sample rows the mesh client sends before writing it. ``triton`` writes a Triton
python-backend model (it squares its input) and needs only the standard library.

Files are written under a temporary name and renamed, so the store never serves half a
model. Plain Python 3.10+, no project imports: it runs in images that lack the project.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

#: iris measurements, one clear case per class, and the class each must get
IRIS_ROWS = ((5.1, 3.5, 1.4, 0.2), (5.9, 2.8, 4.3, 1.3), (7.2, 3.2, 6.0, 1.8))
IRIS_CLASSES = (0, 1, 2)

SQUARER_CONFIG = """\
backend: "python"
max_batch_size: 0
input [
  {
    name: "VALUES"
    data_type: TYPE_FP32
    dims: [ -1 ]
  }
]
output [
  {
    name: "SQUARES"
    data_type: TYPE_FP32
    dims: [ -1 ]
  }
]
instance_group [ { kind: KIND_CPU, count: 1 } ]
"""

SQUARER_MODEL = '''\
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Answers each request with the element-wise square of VALUES."""

    def execute(self, requests):
        responses = []
        for request in requests:
            values = pb_utils.get_input_tensor_by_name(request, "VALUES").as_numpy()
            squares = pb_utils.Tensor("SQUARES", (values * values).astype("float32"))
            responses.append(pb_utils.InferenceResponse(output_tensors=[squares]))
        return responses
'''


def write_atomically(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=".seed-")
    temporary = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        temporary.chmod(0o644)
        temporary.replace(target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def seed_sklearn(bucket_dir: Path) -> list[Path]:
    import io

    import joblib
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    features, labels = load_iris(return_X_y=True)
    model = LogisticRegression(max_iter=1000, random_state=0).fit(features, labels)
    predicted = tuple(int(p) for p in model.predict([list(row) for row in IRIS_ROWS]))
    if predicted != IRIS_CLASSES:
        raise SystemExit(f"seed: the trained model predicts {predicted}, expected {IRIS_CLASSES}")
    buffer = io.BytesIO()
    joblib.dump(model, buffer)
    target = bucket_dir / "sklearn" / "iris" / "model.joblib"
    write_atomically(target, buffer.getvalue())
    return [target]


def seed_triton(bucket_dir: Path) -> list[Path]:
    model_dir = bucket_dir / "triton" / "squarer"
    config, code = model_dir / "config.pbtxt", model_dir / "1" / "model.py"
    write_atomically(code, SQUARER_MODEL.encode())
    write_atomically(config, SQUARER_CONFIG.encode())
    return [config, code]


SEEDERS = {"sklearn": seed_sklearn, "triton": seed_triton}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(SEEDERS), help="which sample model to write")
    parser.add_argument("bucket_dir", type=Path, help="the bucket's folder in the store (/data/models)")
    args = parser.parse_args(argv)
    written = SEEDERS[args.model](args.bucket_dir)
    for path in written:
        print(f"seed: wrote {path} ({path.stat().st_size} bytes)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
