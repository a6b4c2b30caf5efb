"""Specification of the params files as ``llm.config`` reads them: every bad input is refused before any work,
with the file, key and line named."""

from __future__ import annotations

import math
import re
import time
import typing

import pytest

from llm.config import (
    ChatDataParams,
    DataParams,
    EvalParams,
    ExportParams,
    FetchLimits,
    FinetuneParams,
    ModelConfig,
    ParamsError,
    PretrainParams,
    TokenizerParams,
    apply_overrides,
    check_until_step,
    load_params,
    parse_yaml,
    validate_params,
)

PARAMS_MODELS = [ModelConfig, DataParams, TokenizerParams, PretrainParams, FinetuneParams, ChatDataParams,
                 EvalParams, ExportParams, FetchLimits]


def float_fields(model) -> list[str]:
    """The fields of ``model`` that hold a float (``float`` or ``float | None``)."""
    return [name for name, field in model.model_fields.items()
            if field.annotation is float or float in typing.get_args(field.annotation)]


FLOAT_FIELDS = [(model, name) for model in PARAMS_MODELS for name in float_fields(model)]


def test_the_non_finite_check_below_covers_every_params_model():
    assert {model for model, _ in FLOAT_FIELDS} == set(PARAMS_MODELS)  # each has a float field
    assert {(PretrainParams, "learning_rate"), (FinetuneParams, "dropout"), (EvalParams, "top_p")} <= set(FLOAT_FIELDS)


# ---------------------------------------------------------------------------------------------- the file


def test_a_missing_params_file_is_an_error_naming_the_path_not_the_defaults(tmp_path):
    missing = tmp_path / "params" / "pretrain.yaml"
    with pytest.raises(ParamsError, match=rf"^{missing}: params file not found \(looked for {missing}\)"):
        load_params(PretrainParams, missing)


def test_no_params_file_must_be_said_explicitly():
    params = load_params(PretrainParams, None, {"max_steps": 7})
    assert params == PretrainParams(max_steps=7)
    with pytest.raises(ParamsError, match=r"^PretrainParams \(no params file\): max_stepz: unknown key"):
        load_params(PretrainParams, None, {"max_stepz": 7})


@pytest.mark.parametrize(
    ("text", "key", "line", "first"),
    [("max_steps: 10\nbatch_size: 4\nmax_steps: 20\n", "max_steps", 3, 1),
     ("chat_data:\n  max_turns: 2\n  val_fraction: 0.2\n  max_turns: 3\n", "chat_data.max_turns", 4, 2),
     ("chat_data: {max_turns: 2, max_turns: 3}\n", "chat_data.max_turns", 1, 1)],
    ids=["top level", "nested", "flow mapping"],
)
def test_a_key_written_twice_is_an_error_naming_file_key_and_both_lines(tmp_path, text, key, line, first):
    path = tmp_path / "finetune.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError, match=rf"^{path}: line {line}: duplicate key '{key}' \(first on line {first}\)"):
        load_params(FinetuneParams, path)


def test_yaml_merge_keys_may_still_be_overridden():
    assert parse_yaml("base: &b {a: 1, b: 2}\nother:\n  <<: *b\n  a: 3\n", "x.yaml")["other"] == {"a": 3, "b": 2}


def test_invalid_yaml_names_the_file_and_position(tmp_path):
    path = tmp_path / "data.yaml"
    path.write_text("val_fraction: [0.1\n")
    with pytest.raises(ParamsError, match=rf"(?s){path}: not valid YAML: .*in \"{path}\", line 1, column 15"):
        load_params(DataParams, path)


@pytest.mark.parametrize("text", ["learning_rate: .inf", "learning_rate: -.inf", "learning_rate: .nan",
                                  "learning_rate: nan", "learning_rate: inf", "learning_rate: 1e999"])
def test_a_non_finite_float_in_a_params_file_is_refused_naming_the_key(tmp_path, text):
    path = tmp_path / "pretrain.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ParamsError, match=rf"^{path}: learning_rate: "):
        load_params(PretrainParams, path)


@pytest.mark.parametrize(("model", "field"), FLOAT_FIELDS, ids=[f"{m.__name__}.{n}" for m, n in FLOAT_FIELDS])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
def test_every_float_field_of_every_params_model_refuses_non_finite_values(model, field, value):
    with pytest.raises(ParamsError, match=rf"^src: {field}: Input should be a finite number"):
        validate_params(model, {field: value}, "src")


def test_a_non_finite_float_nested_in_chat_data_names_the_dotted_key():
    with pytest.raises(ParamsError, match=r"^src: chat_data\.val_fraction: Input should be a finite number"):
        validate_params(FinetuneParams, {"chat_data": {"val_fraction": math.nan}}, "src")


# ---------------------------------------------------------------------------------------------- overrides

FINETUNE_YAML = """max_steps: 300
chat_data:
  max_turns: 2
  max_speech_chars: 123
  system_template: "Speak as {name}."
"""


@pytest.mark.parametrize("override", [{"chat_data.max_turns": 3}, {"chat_data": {"max_turns": 3}}],
                         ids=["dotted key", "mapping"])
def test_an_override_of_a_nested_key_keeps_the_files_other_keys(tmp_path, override):
    path = tmp_path / "finetune.yaml"
    path.write_text(FINETUNE_YAML)
    params = load_params(FinetuneParams, path, override)
    assert params.chat_data.max_turns == 3
    assert params.chat_data.max_speech_chars == 123 and params.chat_data.system_template == "Speak as {name}."
    assert params.max_steps == 300


def test_overrides_apply_in_order_and_leave_the_data_alone():
    data = {"a": 1, "c": {"x": 1, "y": {"p": 1, "q": 2}}}
    merged = apply_overrides(data, {"c": {"y": {"q": 5}}, "c.x": 7, "d.e": 1, "a": [1, 2]}, "src")
    assert merged == {"a": [1, 2], "c": {"x": 7, "y": {"p": 1, "q": 5}}, "d": {"e": 1}}
    assert data == {"a": 1, "c": {"x": 1, "y": {"p": 1, "q": 2}}}


@pytest.mark.parametrize(("override", "message"), [({"max_steps.x": 1}, r"max_steps is 300, not a mapping"),
                                                   ({"chat_data..max_turns": 1}, r"a key may not be empty")])
def test_an_override_that_names_no_key_is_refused(tmp_path, override, message):
    path = tmp_path / "finetune.yaml"
    path.write_text(FINETUNE_YAML)
    with pytest.raises(ParamsError, match=rf"^{path}: override '{re.escape(next(iter(override)))}': {message}"):
        load_params(FinetuneParams, path, override)


def test_a_misspelt_nested_override_names_the_dotted_key(tmp_path):
    path = tmp_path / "finetune.yaml"
    path.write_text(FINETUNE_YAML)
    with pytest.raises(ParamsError, match=rf"^{path}: chat_data\.max_turnz: unknown key"):
        load_params(FinetuneParams, path, {"chat_data.max_turnz": 3})


# ---------------------------------------------------------------------------------------------- the rest


@pytest.mark.parametrize("until_step", [0, -1, True, 2.5])
def test_until_step_must_be_a_step_number_of_at_least_one(until_step):
    with pytest.raises(ParamsError, match=rf"^until_step={until_step!r}: must be a step number of at least 1"):
        check_until_step(until_step)


def test_until_step_may_be_unset_or_any_step():
    check_until_step(None)
    check_until_step(1)
    check_until_step(10**6)


def test_fetch_limits_take_sizes_with_units_and_refuse_nonsense():
    assert FetchLimits().max_bytes == 2_000_000_000 and FetchLimits().max_member_bytes == 1_000_000_000
    assert validate_params(FetchLimits, {"max_bytes": "8GB", "max_member_bytes": "512MiB"}, "src").max_bytes == 8e9
    with pytest.raises(ParamsError, match=r"^llm data fetch: max_bytes: could not parse"):
        validate_params(FetchLimits, {"max_bytes": "lots"}, "llm data fetch")
    with pytest.raises(ParamsError, match=r"timeout_s: Input should be a finite number"):
        validate_params(FetchLimits, {"timeout_s": math.inf}, "src")


def test_nested_aliases_are_refused_before_they_expand(tmp_path):
    lines = ["a0: &a0 [1, 2, 3, 4, 5, 6, 7, 8, 9]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1},"
              f" *a{i - 1}]" for i in range(1, 10)]  # 9**10 values once expanded
    path = tmp_path / "pretrain.yaml"
    path.write_text("\n".join(lines) + "\n")
    start = time.perf_counter()
    with pytest.raises(ParamsError, match=rf"^{path}: line \d+: the document expands to more than 100000 values"):
        load_params(PretrainParams, path)
    assert time.perf_counter() - start < 2.0
    # a merge key, and an alias used a few times, still read as before
    text = "base: &b {a: 1, b: 2}\nx: *b\ny: *b\nother:\n  <<: *b\n  a: 3\n"
    assert parse_yaml(text, "x.yaml")["y"] == {"a": 1, "b": 2}


@pytest.mark.parametrize(("model", "text", "key"), [
    (ModelConfig, "n_layer: true", "n_layer"),
    (ModelConfig, "qk_norm: 'yes'", "qk_norm"),
    (ModelConfig, "tie_weights: 1", "tie_weights"),
    (ModelConfig, "d_model: '384'", "d_model"),
    (PretrainParams, "learning_rate: true", "learning_rate"),
    (PretrainParams, "batch_size: false", "batch_size"),
])
def test_params_types_are_not_coerced(tmp_path, model, text, key):
    path = tmp_path / "params.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ParamsError, match=rf"^{path}: {key}: Input should be a valid .* is not converted"):
        load_params(model, path)


def test_a_float_written_without_a_dot_still_loads(tmp_path):
    path = tmp_path / "pretrain.yaml"
    path.write_text("learning_rate: 3e-4\n")  # YAML 1.1 reads it as a string
    assert load_params(PretrainParams, path).learning_rate == 3e-4


@pytest.mark.parametrize(("model", "key", "value"), [
    (ModelConfig, "context_length", 1_000_000_000), (ModelConfig, "n_layer", 100_000),
    (ModelConfig, "d_model", 10_000_000), (ModelConfig, "vocab_size", 10**9),
    (ModelConfig, "d_ff", 10**9), (PretrainParams, "batch_size", 10**8),
])
def test_sizes_past_their_upper_bound_are_refused_naming_file_and_key(tmp_path, model, key, value):
    path = tmp_path / "params.yaml"
    path.write_text(f"{key}: {value}\n")
    with pytest.raises(ParamsError, match=rf"^{path}: {key}: .*less than or equal"):
        load_params(model, path)
    assert load_params(model, None, {key: 96}).model_dump()[key] == 96  # a sensible size still loads
