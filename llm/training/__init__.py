"""Training: the loop in phases, pretraining, chat finetuning, evaluation, devices and data parallelism.

Takes callbacks for tracking; never imports MLflow or Prefect.
"""
