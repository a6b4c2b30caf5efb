"""MLflow: experiment tracking, the ``gpt`` model registry and the served pyfunc (the only MLflow importers)."""
