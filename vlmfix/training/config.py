"""The trainers' one config and command-line path: a frozen dataclass of settings, read from YAML and
`key=value` overrides with OmegaConf's typing, checked with `vlmfix.validation`.

    python -m vlmfix.training.dcd --config conf/train/dcd.yaml learning_rate=1e-3 projectors=[neg]
    python -m vlmfix.training.aia_trainer --config conf/train/aia.yaml max_steps=200 trainable=qk

Values are typed as OmegaConf (YAML 1.2 numbers) types them: `1e-3` is a float, `2` an int, `null` None,
`[a, b]` a list, and `abc` or `'1e-3'` (quoted) a string, which a numeric setting then refuses with a
message naming the setting. An unknown key is refused with the list of known ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar, cast

from vlmfix.errors import VlmfixError

Config = TypeVar("Config", bound="TrainConfig")
TOY_MODELS = ("toy", "toy_fast")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class ConfigError(VlmfixError, ValueError):
    """A training setting is unknown, malformed or points at nothing; the message names it and the fix."""


def optional(check: Callable[..., Any], value: Any, name: str, **checks: Any) -> Any:
    """None, or `check(value, name, **checks)` (a `vlmfix.validation` check) with "None or" in its message."""
    if value is None:
        return None
    try:
        return check(value, name, **checks)
    except ValueError as error:
        raise ValueError(str(error).replace(" must be ", " must be None or ", 1)) from None


def plain(value: Any) -> Any:
    """`value` as JSON would store it (tuples become lists), so saved and current settings compare equal."""
    return json.loads(json.dumps(value, default=str))


@dataclass(frozen=True)
class TrainConfig:
    """Base of the trainers' settings classes (`DCDTrainConfig`, `AIATrainConfig`).

    Subclasses declare their settings as fields, check them in `__post_init__` with `vlmfix.validation`, and
    name in `RESUME_NEUTRAL` the settings that do not change what a run computes (where it writes, how often
    it saves, its thread count), so a run may resume with other values of those.
    """

    WHAT: ClassVar[str] = "training"
    RESUME_NEUTRAL: ClassVar[frozenset[str]] = frozenset(
        {"output_dir", "threads", "save_every", "keep_checkpoints", "resume", "log_every"}
    )
    RENAMED: ClassVar[dict[str, str]] = {}

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_mapping(cls: type[Config], values: Mapping[str, Any]) -> Config:
        """Build from a mapping (a YAML file's contents and overrides); `_target_` is ignored."""
        values = {k: v for k, v in values.items() if k != "_target_"}
        unknown = sorted(set(values) - set(cls.keys()))
        if unknown:
            renamed = [f"`{k}` is now `{cls.RENAMED[k]}`" for k in unknown if k in cls.RENAMED]
            hint = f" ({'; '.join(renamed)})" if renamed else ""
            raise ConfigError(f"unknown {cls.WHAT} settings {unknown}{hint}. Known: {', '.join(cls.keys())}.")
        return cls(**values)

    def fingerprint(self) -> dict[str, Any]:
        """The settings that decide what a run computes (all but `RESUME_NEUTRAL`), JSON-typed."""
        return plain({k: v for k, v in self.as_dict().items() if k not in self.RESUME_NEUTRAL})


def differing_keys(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Keys whose JSON-typed values differ between two fingerprints (a key missing on one side differs)."""
    saved, current = plain(dict(saved)), plain(dict(current))
    return sorted(k for k in set(saved) | set(current) if saved.get(k, "<unset>") != current.get(k, "<unset>"))


def describe_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str:
    """"key: saved -> current" for each differing key, for refusal messages."""
    saved, current = plain(dict(saved)), plain(dict(current))
    return "; ".join(f"{k}: {saved.get(k, '<unset>')!r} -> {current.get(k, '<unset>')!r}"
                     for k in differing_keys(saved, current))


def check_same_settings(saved: Mapping[str, Any], current: Mapping[str, Any], source: str) -> None:
    """ConfigError naming each setting that differs between a checkpoint's (`saved`) and this run's."""
    if differing_keys(saved, current):
        raise ConfigError(
            f"{source} was written with other settings ({describe_differences(saved, current)}). Resume with the same "
            "settings, or start over with resume=false (this deletes the run's checkpoints in output_dir) or "
            "another output_dir."
        )


# ---------------------------------------------------------------------------------------------- command line
def parse_cli(config_class: type[Config], argv: Sequence[str] | None, *, prog: str, description: str) -> Config:
    """`[--config FILE.yaml] key=value ...` -> a checked `config_class` (ConfigError on a bad setting)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    defaults = {f.name: f.default for f in dataclasses.fields(config_class)}
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="settings (default):\n" + "\n".join(f"  {k} ({defaults[k]!r})" for k in config_class.keys()),
    )
    parser.add_argument("--config", help="a YAML file of settings (e.g. conf/train/*.yaml); `_target_` is ignored")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="settings over the file's, e.g. epochs=2")
    args = parser.parse_args(argv)
    bad = [item for item in args.overrides if "=" not in item or item.startswith("=")]
    if bad:
        raise ConfigError(f"settings are given as key=value, got {bad}. Known keys: {', '.join(config_class.keys())}.")
    merged: DictConfig | ListConfig = OmegaConf.create({})
    try:
        if args.config is not None:
            path = Path(args.config).expanduser()
            if not path.is_file():
                raise ConfigError(f"--config {args.config}: no such file; give a YAML file such as "
                                  "conf/train/dcd.yaml.")
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(args.overrides)))
        values = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as error:
        raise ConfigError(f"cannot read the settings ({type(error).__name__}: {error}).") from None
    try:
        return config_class.from_mapping(cast(Mapping[str, Any], values))  # merged onto a DictConfig: a dict
    except ConfigError:
        raise
    except ValueError as error:
        raise ConfigError(str(error)) from None


def run_cli(main: Callable[[Sequence[str] | None], Any]) -> None:
    """Run a trainer's `main` as a command: a vlmfix error (bad setting, data, checkpoint) ends it with its
    message and exit status 2, not a traceback."""
    try:
        main(None)
    except VlmfixError as error:
        import sys

        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


# ---------------------------------------------------------------------------------------------- paths
def check_model_source(model: str) -> str:
    """`model` if it is a model directory (with config.json) or a hub id in the local Hugging Face cache;
    ConfigError otherwise, before anything loads."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"`model` {model!r} is a directory without config.json; point it at a directory "
                              "written by save_pretrained (config.json, weights, processor files).")
        return model
    if _HUB_ID.match(model) and not path.exists():
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(model, "config.json"), str):
            return model
    raise ConfigError(f"`model` {model!r} does not exist: it is neither a model directory nor a model in the local "
                      f"Hugging Face cache. Give a directory written by save_pretrained, a cached hub id, or one of "
                      f"{', '.join(TOY_MODELS)} (the toy VLM, built on first use).")


def check_path(value: str, name: str, what: str) -> Path:
    """`value` as an existing path; ConfigError naming the setting otherwise."""
    path = Path(value).expanduser()
    if not path.exists():
        raise ConfigError(f"`{name}` {value!r} does not exist; give {what}.")
    return path
