"""medseg as an MLflow pyfunc model: ``mlflow.pyfunc.load_model(uri).predict(df)`` and ``mlflow models serve``."""
