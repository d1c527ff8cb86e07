"""Experiment config: YAML in, one frozen dataclass per component out, and the run hash.

Every key is checked against the dataclasses below: an unknown key, a wrong type or a value out
of range raises `ConfigError` naming the dotted key, the value and what is accepted.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prismatic.errors import ConfigError

RUN_HASH_LENGTH = 9
DEFAULT_COLLECTOR = "tcp://127.0.0.1:5557"
DEFAULT_RUNS_DIR = "build/runs"


def _spec(default: Any, **rules: Any) -> Any:
    """A dataclass field with validation rules: choices, min, max (inclusive), min_excl."""
    return field(default=default, metadata=rules)


@dataclass(frozen=True)
class ModelConfig:
    router_type: str = _spec("prismatic", choices=("prismatic", "dense"))
    num_experts: int = _spec(3, min=1, max=64)
    perturbation_scale: float = _spec(1.0, min=0.0)
    sparsity: float = _spec(0.1, min_excl=0.0, max=1.0)
    perturbation_strategy: str = _spec(
        "dual_sided", choices=("dual_sided", "top_only", "bottom_only", "random")
    )
    mixing: str = _spec("outputs", choices=("outputs", "smear", "topk"))
    top_k: int = _spec(1, min=1)
    expert_dropout: float = _spec(0.1, min=0.0, max=0.99)
    n_layers: int = _spec(4, min=1, max=64)
    d_model: int = _spec(256, min=8)
    n_heads: int = _spec(4, min=1)
    seq_len: int = _spec(128, min=2, max=65_536)
    mlp_ratio: int = _spec(4, min=1)
    dropout: float = _spec(0.0, min=0.0, max=0.99)


@dataclass(frozen=True)
class DataConfig:
    path: str | None = _spec(None)
    val_fraction: float = _spec(0.05, min=0.0, max=0.5)
    max_bytes: int = _spec(20_000_000, min=10_000)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = _spec(2000, min=1, max=100_000_000)
    batch_size: int = _spec(16, min=1)
    lr: float = _spec(3.0e-4, min_excl=0.0)
    weight_decay: float = _spec(0.0, min=0.0)
    grad_clip: float = _spec(1.0, min=0.0)
    grad_accum: int = _spec(1, min=1)
    precision: str = _spec("fp32", choices=("fp32", "bf16", "fp16"))
    eval_every: int = _spec(200, min=0)
    eval_batches: int = _spec(4, min=1)
    checkpoint_every: int = _spec(500, min=0)
    world_size: int = _spec(1, min=1, max=1024)
    device: str = _spec("cpu")
    threads: int = _spec(1, min=0)


@dataclass(frozen=True)
class DynamicsConfig:
    enabled: bool = _spec(True)
    log_freq: int = _spec(10, min=1)
    collector: str = _spec(DEFAULT_COLLECTOR)
    spool: bool = _spec(True)
    send_hwm: int = _spec(10_000, min=1)
    linger_s: float = _spec(1.0, min=0.0, max=3600.0)
    curve_server_key: str | None = _spec(None)
    curve_client_key_file: str | None = _spec(None)


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = _spec("dual-sided")
    seed: int = _spec(0, min=0)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dynamics: DynamicsConfig = field(default_factory=DynamicsConfig)


# Keys that change where a run reports or how fast it goes, not what it computes.
NON_EXPERIMENT_KEYS = (
    "dynamics.collector",
    "dynamics.spool",
    "dynamics.send_hwm",
    "dynamics.linger_s",
    "dynamics.curve_server_key",
    "dynamics.curve_client_key_file",
    "train.threads",
    "train.device",
)


# --- reading YAML ------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader with two fixes for hand-written configs.

    - `1e-3` is a number, as in YAML 1.2 and in Python; PyYAML follows YAML 1.1, which wants
      `1.0e-3` and otherwise reads the text "1e-3" (so `lr: 1e-3` would fail as "not a number").
    - A key written twice in one mapping is an error; PyYAML silently keeps the last one.
    """

    yaml_implicit_resolvers = {
        first: list(resolvers)
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, typing.Hashable):
                continue  # SafeLoader itself rejects it below
            if key in seen:
                raise ConfigError(
                    f"{key_node.start_mark.name}: key {key!r} is written twice in one mapping "
                    f"(lines {seen[key]} and {line}); keep one"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


# Exponent without a dot (1e-3, 5E+4, -2e6): the forms YAML 1.1 reads as strings. After the
# built-in resolvers, so plain integers stay integers.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str, name: str = "<text>") -> Any:
    """YAML as a config file is meant: `1e-3` is a number, a repeated key is a ConfigError."""
    loader = _Loader(text)
    loader.name = name
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def load_yaml_file(path: Path, what: str) -> Any:
    """`load_yaml` of a file; a YAML syntax error is a ConfigError starting with `what`."""
    try:
        return load_yaml(path.read_text(encoding="utf-8"), str(path))
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(f"{what}: {str(path)!r} is not valid YAML ({first})") from exc


def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    args = typing.get_args(tp)
    if args:
        parts = [names.get(a, "null") for a in args]
        return " or ".join(parts)
    return names.get(tp, str(tp))


def _check_scalar(key: str, value: Any, tp: Any, rules: dict[str, Any]) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        return _check_scalar(key, value, inner, rules)
    accepted = _describe(tp, rules)
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, tp)
    if not ok:
        shown = "an empty value (null)" if value is None else repr(value)
        raise ConfigError(f"{key}: {shown} is not accepted; expected {accepted}")
    if "choices" in rules and value not in rules["choices"]:
        raise ConfigError(f"{key}: {value!r} is not accepted; expected {accepted}")
    too_low = ("min" in rules and value < rules["min"]) or (
        "min_excl" in rules and value <= rules["min_excl"]
    )
    too_high = "max" in rules and value > rules["max"]
    if too_low or too_high:
        raise ConfigError(f"{key}: {value!r} is not accepted; expected {accepted}")
    return value


def _describe(tp: Any, rules: dict[str, Any]) -> str:
    if "choices" in rules:
        return "one of " + ", ".join(rules["choices"])
    text = _type_name(tp)
    bounds = []
    if "min" in rules:
        bounds.append(f">= {rules['min']}")
    if "min_excl" in rules:
        bounds.append(f"> {rules['min_excl']}")
    if "max" in rules:
        bounds.append(f"<= {rules['max']}")
    return text + (" " + " and ".join(bounds) if bounds else "")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "the config"
        raise ConfigError(f"{where}: {data!r} is not accepted; expected a mapping of keys")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, data)) - set(known))
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise ConfigError(f"{key}: unknown key; accepted keys here: {', '.join(known)}")
    values = {}
    for name, value in data.items():
        tp = hints[name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            values[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            values[name] = _check_scalar(f"{prefix}{name}", value, tp, dict(known[name].metadata))
    return cls(**values)


def _cross_check(cfg: ExperimentConfig) -> None:
    m = cfg.model
    if m.router_type == "prismatic" and m.num_experts < 2:
        raise ConfigError(
            f"model.num_experts: {m.num_experts} is not accepted for router_type prismatic; "
            "expected 2 or more (expert 0 stays clean, the others are perturbed); for a model "
            "without experts use router_type: dense"
        )
    if m.d_model % m.n_heads:
        raise ConfigError(
            f"model.n_heads: {m.n_heads} is not accepted; "
            f"it must divide model.d_model ({m.d_model})"
        )
    if m.mixing == "topk" and m.top_k > m.num_experts:
        raise ConfigError(
            f"model.top_k: {m.top_k} is not accepted; "
            f"expected 1..model.num_experts ({m.num_experts})"
        )
    check_address("dynamics.collector", cfg.dynamics.collector)


_ADDRESS_FORMS = "tcp://HOST:PORT (port 1..65535), ipc://PATH or inproc://NAME"


def check_address(key: str, address: str, bind: bool = False) -> str:
    """A ZeroMQ address a socket can use; raises ConfigError naming `key` otherwise.

    libzmq itself fails late and unhelpfully: a connect to `garbage` raises only when the
    publisher starts (after the corpus loaded), and a bind to port 99999 silently takes some
    other port. `bind`: also accept `*` (or 0) as the port, meaning any free one."""
    scheme, sep, rest = address.partition("://")
    forms = _ADDRESS_FORMS + (", with * for any free port" if bind else "")
    problem = f"{key}: {address!r} is not accepted; expected {forms}"
    if not sep or scheme not in ("tcp", "ipc", "inproc") or not rest:
        raise ConfigError(problem)
    if scheme != "tcp":
        return address
    host, colon, port = rest.rpartition(":")
    if not colon or not host.strip("[]"):
        raise ConfigError(problem)
    if bind and port in ("*", "0"):
        return address
    if not (port.isdigit() and 1 <= int(port) <= 65535):
        raise ConfigError(problem)
    return address


def is_ipv6(address: str) -> bool:
    """Whether a ZeroMQ address names an IPv6 host (`tcp://[::1]:5557`): libzmq then needs
    its IPV6 option, off by default (without it, `No such device`)."""
    return address.startswith("tcp://[")


def parse_override(text: str) -> tuple[str, Any]:
    """Split `train.steps=200` into ("train.steps", 200); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(
            f"--set: {text!r} is not accepted; expected KEY=VALUE, e.g. train.steps=200"
        )
    try:
        value = load_yaml(raw, "--set") if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def apply_override(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {part} is not a section; cannot set {parts[-1]} inside it")
        node = child
    node[parts[-1]] = value


def load_config_data(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"config: {str(p)!r} is not a file; pass a YAML file such as configs/default.yaml"
        )
    data = load_yaml_file(p, "config")
    return {} if data is None else data


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> ExperimentConfig:
    """Read a YAML file, apply `--set` overrides (and `extra` dotted keys), validate."""
    data = copy.deepcopy(load_config_data(path))
    if not isinstance(data, dict):
        raise ConfigError(f"config: {str(path)!r} must hold a mapping of keys at the top level")
    for text in overrides or []:
        apply_override(data, *parse_override(text))
    for key, value in (extra or {}).items():
        apply_override(data, key, value)
    return from_dict(data)


def from_dict(data: dict[str, Any]) -> ExperimentConfig:
    cfg = _build(ExperimentConfig, data, "")
    _cross_check(cfg)
    return cfg


def to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def with_values(cfg: ExperimentConfig, **dotted: Any) -> ExperimentConfig:
    """A copy of `cfg` with dotted keys replaced, e.g. with_values(cfg, **{"train.steps": 5})."""
    data = to_dict(cfg)
    for key, value in dotted.items():
        apply_override(data, key, value)
    return from_dict(data)


def run_hash(cfg: ExperimentConfig) -> str:
    """First 9 hex chars of SHA-256 over the canonical JSON of what defines the experiment."""
    data = to_dict(cfg)
    for key in NON_EXPERIMENT_KEYS:
        section, name = key.split(".")
        data[section].pop(name, None)
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:RUN_HASH_LENGTH]


def dump_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
