"""Config files: a run's options in one YAML or TOML file, a section per option group.

    [model]                     model: smollm2
    model = "smollm2"           data:
    [optimisation]                dataset: hamlet
    max_steps = 200             safe:
    [safe]                        tau: 0.2
    tau = 0.2

Sections are the option groups (training/config.py: model, data, adapter, method,
optimisation, memory, output), ``safe`` (``SafeConfig``) and ``checkpoints`` (``train``'s
``save_every`` and ``keep_checkpoints``: how a run is saved, not what it is, so not part of
its identity); keys are the long flags, with ``-`` or ``_``. A flat file of ``name: value``
pairs (the format before sections) is read too: every option name belongs to exactly one group.
Values are checked against the option's type here, so that a mistake is named with the file it is in.
"""

from __future__ import annotations

from dataclasses import Field, fields
from pathlib import Path
from typing import Any

from safefreeze.core.config import ConfigError

# Flags of ``safefreeze train`` a file may set besides the options, by section (the group --help lists them in);
# all of them whole numbers.
RUN_FLAGS = {"save_every": "checkpoints", "keep_checkpoints": "checkpoints"}


def value_type(annotation: str) -> type:
    """The type an option's value is read as: the number type of its annotation, else ``str``."""
    return int if "int" in annotation else float if "float" in annotation else str


def read_mapping(path: Path, flag: str = "--config") -> dict:
    """The mapping a YAML (.yaml/.yml) or TOML (.toml) file holds; ``ConfigError`` naming ``flag`` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{flag} {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        parse, error_type = yaml.safe_load, yaml.YAMLError
    elif path.suffix == ".toml":
        import tomllib

        parse, error_type = tomllib.loads, tomllib.TOMLDecodeError
    else:
        raise ConfigError(f"{flag} {path}: use a .yaml, .yml or .toml file")
    try:
        data = parse(text)
    except error_type as error:
        raise ConfigError(f"{flag} {path} cannot be read: {' '.join(str(error).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{flag} {path} must hold name: value pairs, not a {type(data).__name__}")
    return data


def read_options(path: Path, groups: dict[str, type], flags: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The options of a config file, by section: ``{section: {option name: value}}``.

    Args:
        path: the YAML or TOML file.
        groups: section name → the dataclass whose fields its options are (in lookup order:
            a flat key goes to the first group that has it).
        flags: names a file may also set that are not options (``out``...) → their section;
            ``RUN_FLAGS`` are always accepted.
    """
    where = f"--config {path}"
    flags = {**RUN_FLAGS, **flags}
    home = {**{f.name: s for s, group in reversed(groups.items()) for f in fields(group)}, **flags}
    options: dict[str, dict[str, Any]] = {section: {} for section in groups}
    for key, value in read_mapping(path).items():
        key = str(key).replace("-", "_")
        if isinstance(value, dict) and (key in groups or key in flags.values()):
            entries, section = value.items(), key
        elif key in home:
            entries, section = [(key, value)], None  # a flat file: the option's own group
        else:
            raise ConfigError(f"{where}: unknown option {key!r}; use the long flags of --help")
        for name, item in entries:
            name = str(name).replace("-", "_")
            if name not in home:
                raise ConfigError(f"{where}: unknown option {name!r}; use the long flags of --help")
            in_section = section or home[name]
            known = {f.name: f for f in fields(groups[in_section])} if in_section in groups else {}
            if name not in known and flags.get(name) != in_section:
                raise ConfigError(f"{where}: option {name!r} belongs in [{home[name]}], not [{in_section}]")
            if name in known:
                item = _checked(known[name], item, where)
            elif name in RUN_FLAGS and not (isinstance(item, int) and not isinstance(item, bool)):
                raise ConfigError(f"{where}: {name} must be a whole number, got {item!r}")
            options.setdefault(in_section, {})[name] = item
    return options


def _checked(option: Field, value, where: str):
    """``value`` as the option's type (a list becomes comma-separated text for a text option)."""
    if value is None:
        return None
    annotation = str(option.type)
    kind = bool if annotation == "bool" else value_type(annotation)
    if kind is str and isinstance(value, list):
        value = ",".join(map(str, value))
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is str:  # a name such as a path may be a number in the file
        ok = isinstance(value, (str, int, float)) and not isinstance(value, bool)
    else:  # a number (int: a whole one), or a word such as 'auto' where the annotation allows text
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = (number and (kind is float or float(value).is_integer())) or (
            isinstance(value, str) and "str" in annotation
        )
    if not ok:
        raise ConfigError(f"{where}: {option.name} must be a {kind.__name__}, got {value!r}")
    return value if kind is bool or (isinstance(value, str) and kind is not str) else kind(value)
