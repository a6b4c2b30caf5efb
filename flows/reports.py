"""What the evaluate and export flows show in the Prefect UI: their results as markdown artifacts on the flow run
(tab "Artifacts"; the latest of each key is also on the UI's Artifacts page).

The builders are plain functions of the stage results; ``publish_*`` creates the artifact inside the running flow.
"""

from __future__ import annotations

from typing import Any

from prefect.artifacts import create_markdown_artifact

EVALUATION_KEY = "evaluation"  # Prefect artifact keys: lowercase letters, digits and dashes
PARITY_KEY = "onnx-parity"
SCORE_KEYS = ("val/bpb", "val/loss", "val/ppl", "chat/assistant_bpb", "chat/assistant_loss", "chat/base_assistant_loss")


def _number(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float):  # small differences (parity) keep their digits: 6.7e-06, not 0.0000
        return f"{value:.3g}" if 0 < abs(value) < 1e-3 else f"{value:.4f}"
    return f"{value:,}"


def evaluation_markdown(result: dict, candidate: str) -> str:
    """The scores of an evaluate stage result and its promotion decision (both scores, the reason)."""
    decision = result.get("promotion", {})
    version = decision.get("candidate")
    title = f"Evaluation of `{candidate}`" + (f" (gpt version {version})" if version else "")
    lines = [f"# {title}", "", "| metric | value |", "| --- | ---: |"]
    lines += [f"| {key} | {_number(result[key])} |" for key in SCORE_KEYS if key in result]
    verdict = "promoted to Production" if decision.get("promoted") else "not promoted"
    metric = decision.get("metric", "?")
    production = decision.get("production")
    lines += ["", f"## Promotion: {verdict}", "", f"| model | version | {metric} (lower is better) |",
              "| --- | --- | ---: |",
              f"| candidate | {version or 'not registered'} | {_number(decision.get('candidate_score'))} |",
              f"| Production before | {production or 'none'} | {_number(decision.get('production_score'))} |",
              *(["", f"Both scored on {decision['text']}."] if decision.get("text") else []),
              "", f"Reason: {decision.get('reason', 'none given')}"]
    return "\n".join(lines) + "\n"


def parity_markdown(summary: dict) -> str:
    """The ONNX export's parity against PyTorch (largest logit difference, greedy agreement) and its files."""
    parity = summary.get("parity") or {}
    greedy = parity.get("greedy") or {}
    verdict = "passed" if parity.get("passed") else ("not checked" if not parity else "FAILED")
    lines = [f"# ONNX export: parity {verdict}", "", "| check | value |", "| --- | ---: |",
             f"| max abs logit difference | {_number(parity.get('max_abs_diff'))} (tolerance "
             f"{_number(parity.get('atol'))}) |"]
    if parity.get("ragged"):
        lines.append(f"| ragged batch, max abs logit difference | {_number(parity['ragged'].get('max_abs_logits'))} |")
    if parity.get("static_cache"):
        lines.append(f"| static-cache graph, max abs logit difference | "
                     f"{_number(parity['static_cache'].get('max_abs_logits'))} |")
    elif isinstance(summary.get("static_cache"), str):  # "skipped: <why>"
        lines.append(f"| static-cache graph | {summary['static_cache']} |")
    if greedy:
        graphs = " and ".join(greedy.get("graphs") or ["portable"])
        lines.append(f"| greedy continuations identical to PyTorch ({graphs}) | {greedy.get('identical')} of "
                     f"{greedy.get('prompts')} ({greedy.get('new_tokens')} tokens each) |")
    lines += [f"| opset | {summary.get('opset', '?')} |", f"| registered version | "
              f"{summary.get('model_version') or 'none'} |", "", "| file | bytes |", "| --- | ---: |"]
    lines += [f"| {name} | {size:,} |" for name, size in sorted((summary.get("files") or {}).items())]
    return "\n".join(lines) + "\n"


def publish_evaluation(result: dict, candidate: str) -> None:
    create_markdown_artifact(evaluation_markdown(result, candidate), key=EVALUATION_KEY,
                             description="scores and promotion decision of the evaluate stage")


def publish_parity(summary: dict) -> None:
    create_markdown_artifact(parity_markdown(summary), key=PARITY_KEY,
                             description="ONNX export checked against PyTorch")
