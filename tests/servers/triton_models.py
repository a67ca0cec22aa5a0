"""Small Triton models for the runtime tests, all on the python backend (the only one
the ``nvidia-pytriton`` wheel brings).

Each builder writes a model where the puller would leave it
(``ROOT_MODEL_DIR/<model_id>/...``) and returns its :class:`~puller.request.LocalModel`:

* :func:`configured_model`: a directory with its own ``config.pbtxt`` (whose ``name``
  is not the model id, so the view must drop it), ``1/model.py`` and a labels file;
* :func:`bare_model`: one bare ``.py`` file of model type ``python`` plus a schema:
  the view makes it ``1/model.py`` and generates the ``config.pbtxt``;
* :func:`broken_model`: a configured model whose ``initialize`` raises.

The models double their first input (FP32) into their first output, whatever the
tensors are called: the names come from the configuration Triton hands them.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from protos.inference import grpc_service_pb2 as v2
from puller.model_key import ModelKey
from puller.request import LocalModel

#: the python model type (the ``model_type.name`` of the key)
PYTHON_MODEL_TYPE = "python"

#: the name a configured model's own config.pbtxt gives it
AUTHORS_NAME = "the-authors-name"

#: what every test sends, and what the doubling model answers
SAMPLE: tuple[float, ...] = (1.0, 2.5, -3.0)
EXPECTED: tuple[float, ...] = (2.0, 5.0, -6.0)

DOUBLING_MODEL_PY = '''\
import json

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Doubles its first input into its first output."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        self.output_dtype = pb_utils.triton_string_to_numpy(config["output"][0]["data_type"])

    def execute(self, requests):
        responses = []
        for request in requests:
            values = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
            doubled = (values * 2).astype(self.output_dtype)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(self.output_name, doubled)]))
        return responses
'''

BROKEN_MODEL_PY = """\
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("this model is broken on purpose")

    def execute(self, requests):
        return []
"""

#: a config.pbtxt as a model author writes it: its own name (with a comment on the
#: same line), nested ``name`` fields that must stay, a comment mentioning ``name:``
CONFIG_PBTXT = f"""\
# A python model with its own configuration.
name: "{AUTHORS_NAME}"  # only valid in a directory of that name
backend: "python"
max_batch_size: 0
input [
  {{
    name: "INPUT0"  # name: of the tensor, not of the model
    data_type: TYPE_FP32
    dims: [ -1 ]
  }}
]
output [
  {{
    name: "OUTPUT0"
    data_type: TYPE_FP32
    dims: [ -1 ]
  }}
]
instance_group [ {{ kind: KIND_CPU, count: 1 }} ]
"""

BROKEN_CONFIG_PBTXT = """\
name: "broken"
backend: "python"
"""

#: the schema of the bare model, as ModelMesh passes it
SCHEMA = {
    "inputs": [{"name": "values", "datatype": "FP32", "shape": [-1]}],
    "outputs": [{"name": "doubled", "datatype": "FP32", "shape": [-1]}],
}


def _local(model_id: str, path: Path, schema: Path | None = None) -> LocalModel:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    key = ModelKey(model_type={"name": PYTHON_MODEL_TYPE}, disk_size_bytes=size)
    return LocalModel(model_id, path, size, PYTHON_MODEL_TYPE, schema, key)


def configured_model(root: Path, model_id: str) -> LocalModel:
    """``root/<model_id>/model/`` with config.pbtxt, 1/model.py and labels.txt."""
    model_dir = root / model_id / "model"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(CONFIG_PBTXT)
    (model_dir / "1" / "model.py").write_text(DOUBLING_MODEL_PY)
    (model_dir / "labels.txt").write_text("doubled\n")
    return _local(model_id, model_dir)


def bare_model(root: Path, model_id: str) -> LocalModel:
    """``root/<model_id>/doubler.py`` (a bare model file) and ``_schema.json``."""
    folder = root / model_id
    folder.mkdir(parents=True)
    (folder / "doubler.py").write_text(DOUBLING_MODEL_PY)
    (folder / "_schema.json").write_text(json.dumps(SCHEMA))
    return _local(model_id, folder / "doubler.py", folder / "_schema.json")


def broken_model(root: Path, model_id: str) -> LocalModel:
    """``root/<model_id>/model/`` whose model.py raises in ``initialize``."""
    model_dir = root / model_id / "model"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(BROKEN_CONFIG_PBTXT)
    (model_dir / "1" / "model.py").write_text(BROKEN_MODEL_PY)
    return _local(model_id, model_dir)


def infer_request(model_id: str, input_name: str) -> v2.ModelInferRequest:
    tensor = v2.ModelInferRequest.InferInputTensor(
        name=input_name,
        datatype="FP32",
        shape=[len(SAMPLE)],
        contents=v2.InferTensorContents(fp32_contents=list(SAMPLE)),
    )
    return v2.ModelInferRequest(model_name=model_id, inputs=[tensor])


def fp32_output(response: v2.ModelInferResponse) -> list[float]:
    """The first output's values (Triton answers in raw_output_contents)."""
    output = response.outputs[0]
    assert output.datatype == "FP32", output.datatype
    if response.raw_output_contents:
        raw = response.raw_output_contents[0]
        return list(struct.unpack(f"<{len(raw) // 4}f", raw))
    return list(output.contents.fp32_contents)
