"""Config loading: defaults, overrides, validation errors, and the run hash."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from prismatic.config import (
    ExperimentConfig,
    load_config,
    parse_override,
    run_hash,
    to_dict,
    with_values,
)
from prismatic.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
DEFAULT = REPO / "configs" / "default.yaml"


def test_default_yaml_matches_the_documented_defaults():
    cfg = load_config(DEFAULT)
    assert cfg.name == "dual-sided"
    assert cfg.model.router_type == "prismatic"
    assert cfg.model.num_experts == 3
    assert cfg.model.perturbation_scale == 1.0
    assert cfg.model.sparsity == 0.1
    assert cfg.model.perturbation_strategy == "dual_sided"
    assert cfg.model.mixing == "outputs"
    assert (cfg.model.n_layers, cfg.model.d_model, cfg.model.n_heads, cfg.model.seq_len) == (
        4,
        256,
        4,
        128,
    )
    assert cfg.data.path is None
    assert (cfg.train.steps, cfg.train.batch_size, cfg.train.lr) == (2000, 16, 3.0e-4)
    assert (cfg.dynamics.log_freq, cfg.dynamics.collector) == (10, "tcp://127.0.0.1:5557")
    # The file spells out the dataclass defaults: nothing in it differs from them.
    assert cfg == ExperimentConfig()


def test_default_yaml_names_every_key_there_is():
    """The README sends newcomers to configs/default.yaml for the keys: it must hold them all."""
    import dataclasses

    import yaml

    written = yaml.safe_load(DEFAULT.read_text())

    def keys(cls, data, prefix=""):
        out = []
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.default_factory if callable(f.default_factory) else None):
                out += keys(f.default_factory, data.get(f.name) or {}, f"{prefix}{f.name}.")
            elif f.name not in data:
                out.append(f"{prefix}{f.name}")
        return out

    assert keys(ExperimentConfig, written) == []


def test_overrides_are_parsed_as_yaml_values():
    cfg = load_config(DEFAULT, ["train.steps=200", "model.perturbation_scale=0"])
    assert cfg.train.steps == 200
    assert cfg.model.perturbation_scale == 0.0
    assert parse_override("data.path=null") == ("data.path", None)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.steps=abc", "train.steps: 'abc' is not accepted; expected an integer"),
        ("model.mixing=blend", "model.mixing: 'blend' is not accepted; expected one of outputs"),
        ("model.bogus=1", "model.bogus: unknown key; accepted keys here: router_type"),
        ("train.lr=-1", "train.lr: -1.0 is not accepted; expected a number > 0.0"),
        ("model.sparsity=1.5", "model.sparsity: 1.5 is not accepted"),
        ("train.steps=true", "train.steps: True is not accepted"),
        ("model.n_heads=3", "model.n_heads: 3 is not accepted; it must divide model.d_model"),
        ("dynamics.collector=localhost", "dynamics.collector: 'localhost' is not accepted"),
        ("stepz", "--set: 'stepz' is not accepted; expected KEY=VALUE"),
        ("model.sparsity=0", "model.sparsity: 0.0 is not accepted; expected a number > 0.0"),
        ("model.num_experts=1", "model.num_experts: 1 is not accepted for router_type prismatic"),
        ("model=[1, 2]", "model: [1, 2] is not accepted; expected a mapping of keys"),
        ("name=", "name: an empty value (null) is not accepted; expected a string"),
        (
            "model.seq_len=1280000",
            "model.seq_len: 1280000 is not accepted; expected an integer >= 2 and <= 65536",
        ),
    ],
)
def test_bad_values_name_the_key_the_value_and_what_is_accepted(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(DEFAULT, [override])
    assert str(info.value).startswith(expected)


def test_a_dense_model_may_have_one_expert():
    assert load_config(DEFAULT, ["model.router_type=dense", "model.num_experts=1"])


@pytest.mark.parametrize(
    ("written", "value"),
    [("1e-3", 1e-3), ("5E+4", 5e4), ("+2e-5", 2e-5), ("3.0e-4", 3e-4), ("0.001", 1e-3)],
)
def test_numbers_with_an_exponent_are_numbers_in_files_and_overrides(tmp_path, written, value):
    """PyYAML alone reads `1e-3` (no dot, YAML 1.1) as the text "1e-3"."""
    path = tmp_path / "lr.yaml"
    path.write_text(f"train:\n  lr: {written}\n")
    assert load_config(path).train.lr == value
    assert load_config(
        DEFAULT, [f"train.weight_decay={written.lstrip('-')}"]
    ).train.weight_decay == (abs(value))


def test_integers_and_quoted_text_keep_their_types():
    from prismatic.config import load_yaml

    assert load_yaml("a: 10\nb: 1_000\nc: '1e-3'\nd: 0x10\ne: -2e-5") == {
        "a": 10,
        "b": 1000,
        "c": "1e-3",
        "d": 16,
        "e": -2e-5,
    }


def test_a_key_written_twice_names_the_key_and_both_lines(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("train:\n  lr: 1e-3\n  steps: 5\n  lr: 2e-3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}: key 'lr' is written twice in one mapping (lines 2 and 4); keep one"
    )


def test_unknown_top_level_key_in_a_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ntrian:\n  steps: 3\n")
    with pytest.raises(ConfigError, match="trian: unknown key"):
        load_config(path)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="is not a file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "broken.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)


def test_run_hash_is_nine_hex_chars_of_the_experiment_only():
    cfg = load_config(DEFAULT)
    h = run_hash(cfg)
    assert len(h) == 9 and int(h, 16) >= 0
    # Where the run reports and how many threads it uses do not change the experiment...
    moved = with_values(
        cfg,
        **{
            "dynamics.collector": "tcp://10.0.0.1:6000",
            "train.threads": 2,
            "dynamics.linger_s": 30,
        },
    )
    assert run_hash(moved) == h
    # ...but anything the model or the data sees does.
    assert run_hash(with_values(cfg, **{"model.perturbation_scale": 0.0})) != h
    assert run_hash(with_values(cfg, **{"seed": 1})) != h


def test_run_hash_is_stable_across_processes():
    # The hash names the run folder: another interpreter (another hash seed) must agree.
    code = "from prismatic.config import *; print(run_hash(load_config(None)))"
    other = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONHASHSEED": "123"},
        check=True,
    )
    assert other.stdout.strip() == run_hash(ExperimentConfig())
    assert to_dict(load_config(None)) == to_dict(ExperimentConfig())
