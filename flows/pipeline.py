"""The ``pipeline`` flow: every stage in order, each as a subflow (one run in the UI, a child run per stage)."""

from __future__ import annotations

from prefect import flow

from flows.data import prepare
from flows.evaluate import evaluate
from flows.export import export
from flows.finetune import finetune
from flows.params import Overrides, read_params
from flows.pretrain import pretrain


@flow(name="pipeline")
def pipeline(
    data_overrides: Overrides = None,
    tokenizer_overrides: Overrides = None,
    model_overrides: Overrides = None,
    pretrain_overrides: Overrides = None,
    finetune_overrides: Overrides = None,
    evaluate_overrides: Overrides = None,
    export_overrides: Overrides = None,
    resume: bool = False,
    base_overrides: Overrides = None,
) -> dict:
    """prepare, pretrain, finetune, evaluate, export; one overrides dict per params file. Returns each stage's result.

    Pretraining starts over unless ``resume``, which continues the checkpoint in ``artifacts/pretrain``
    (left by an interrupted attempt of the same run; another run starts over).
    """
    # Every params file is checked before the first stage: a typo in evaluate.yaml must not cost a training run.
    for name, overrides in (("data", data_overrides), ("tokenizer", tokenizer_overrides),
                            ("model", model_overrides), ("pretrain", pretrain_overrides),
                            ("finetune", finetune_overrides), ("evaluate", evaluate_overrides),
                            ("export", export_overrides), ("base", base_overrides)):
        read_params(name, overrides)
    results = {"prepare": prepare(data_overrides, tokenizer_overrides, base_overrides)}
    results["pretrain"] = pretrain(pretrain_overrides, model_overrides, resume=resume, base_overrides=base_overrides)
    results["finetune"] = finetune(finetune_overrides, resume=resume)
    results["evaluate"] = evaluate(evaluate_overrides, candidate="finetune")
    results["export"] = export(export_overrides)
    return results
