"""The latentgate pyfunc model, logged as "models from code": MLflow copies this file into the model and runs it
at load time, so no pickled object is ever unpickled. Weights are safetensors (encoder, adapter, LoRA, base LM);
remote model code is used only if the bundled config asks for it (base.trust_remote_code).

    mlflow.pyfunc.load_model("models:/latentgate@hero").predict(pd.DataFrame({"context": [...], "question": [...]}))
    -> DataFrame with one column, "answer" (greedy latent-path answers, identical to `latentgate eval`'s).
"""

import mlflow
from mlflow.pyfunc import PythonModel

from latentgate.registry.model import load_model_workspace, predict_frame


class LatentgateModel(PythonModel):
    def load_context(self, context):
        self.ws = load_model_workspace(context.artifacts)

    def predict(self, context, model_input, params=None):
        return predict_frame(self.ws, model_input)


mlflow.models.set_model(LatentgateModel())
