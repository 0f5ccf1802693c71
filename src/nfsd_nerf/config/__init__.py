"""Typed configuration: one dataclass per stage (:mod:`.sections`), YAML presets and command-line
overrides (:mod:`.loading`), and the checks that run before any work (:mod:`.checks`).

Every field has a docstring; YAML presets in ``configs/`` set any subset of the fields and
the command line overrides them. Unknown keys and values of the wrong type are refused with
the key's dotted name (a :class:`~nfsd_nerf.errors.UserError`).
"""

from .checks import check_config, check_guidance, with_rule_defaults
from .loading import PRESET_DIR, dump_yaml, from_dict, load_config, merge, parse_override, preset_path, read_yaml, to_dict
from .sections import (
    BUILTIN_MODEL,
    DEFAULT_MODEL,
    BackgroundConfig,
    CameraConfig,
    Config,
    FieldConfig,
    GuidanceConfig,
    LossConfig,
    OptimConfig,
    PromptsConfig,
    RenderConfig,
    TrainConfig,
)

__all__ = [
    "BUILTIN_MODEL", "DEFAULT_MODEL", "PRESET_DIR", "BackgroundConfig", "CameraConfig", "Config", "FieldConfig",
    "GuidanceConfig", "LossConfig", "OptimConfig", "PromptsConfig", "RenderConfig", "TrainConfig", "check_config", "check_guidance",
    "dump_yaml", "from_dict", "load_config", "merge", "parse_override", "preset_path", "read_yaml", "to_dict",
    "with_rule_defaults",
]
