"""Loaded by Python at start-up in the test suite's child processes (tests/conftest.py puts this
folder on PYTHONPATH): fresh MLflow stores are copied from a template (medseg_test_mlflow_template)."""

from medseg_test_mlflow_template import install_after_import

install_after_import()
