"""The detector as an MLflow pyfunc model: images in, one answer per image out; what `mlflow models serve`
answers at /invocations and what the batch scorer (`jobs.score`, `oal score`) loads.

Request (JSON): {"dataframe_split": {"columns": ["image"], "data": [["<base64 PNG or JPEG>"], ...]}}
Answer: label, class_name, confidence, ood_score, is_ood per image. An image that cannot be read fails the whole
request with a 400 answer naming it (the server stays up); the batch scorer keeps such a row, with its error.
"""

from __future__ import annotations

from typing import Any

from mlflow.pyfunc import PythonModel

OUTPUTS = ("label", "class_name", "confidence", "ood_score", "is_ood")


class DetectorModel(PythonModel):
    def load_context(self, context: Any) -> None:
        from oal.detector import Detector

        self.detector = Detector.load(context.artifacts["detector"])

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        import pandas as pd
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        images = _images(model_input)
        answers = self.detector.predict(images)
        errors = [e for e in answers["error"] if e is not None]
        if errors and not (params or {}).get("keep_errors", False):
            raise MlflowException(f"{len(errors)} of {len(images)} inputs are not images the detector can read; the "
                                  f"first: {errors[0]}", error_code=INVALID_PARAMETER_VALUE)
        cols = OUTPUTS + (("error",) if errors else ())
        return pd.DataFrame({k: answers[k] for k in cols})


def _images(model_input: Any) -> list:
    """The images of a request: the "image" column of a DataFrame (bytes, or base64 strings), or a list."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    if hasattr(model_input, "columns"):
        if "image" not in model_input.columns:
            raise MlflowException(f"expected a column 'image' (PNG or JPEG bytes, base64 in JSON); got columns "
                                  f"{list(model_input.columns)}", error_code=INVALID_PARAMETER_VALUE)
        return list(model_input["image"])
    return list(model_input)


def signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema([ColSpec("long", "label"), ColSpec("string", "class_name"), ColSpec("double", "confidence"),
                        ColSpec("double", "ood_score"), ColSpec("boolean", "is_ood")]),
        params=ParamSchema([ParamSpec("keep_errors", "boolean", False)]))
