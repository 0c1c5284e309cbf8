"""The code of every medseg model logged to MLflow ("models from code": no pickle).

MLflow runs this file when a user calls ``mlflow.pyfunc.load_model`` or ``mlflow models serve``;
it only imports the installed medseg. medseg's own loaders never run it: they read the model's
``medseg_model.json`` and ``weights.safetensors`` artifacts.
"""

from mlflow.models import set_model

from medseg.serving.pyfunc import MedsegPyfuncModel

set_model(MedsegPyfuncModel())
