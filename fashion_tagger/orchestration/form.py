"""The DAGs' trigger forms, generated from the config schema (one `FormField` table per form), and trigger
parameters -> `Config`. No Airflow import: the DAGs wrap `form_params()` in `Param`s, plain unit tests cover it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fashion_tagger.core.config import Config, load_config
from fashion_tagger.core.config_sources import merge_overrides, preset_names
from fashion_tagger.core.errors import ConfigError

SOURCE_ENV = "FASHION_TAGGER_SOURCE"
PRESET_ENV = "FASHION_TAGGER_PRESET"
KAGGLE_SMALL = "kaggle:paramaggarwal/fashion-product-images-small"
SYNTHETIC_DEFAULT = "synthetic:3000"
PRESET_PARAM = "preset"
KEEP, YES, NO = "keep", "yes", "no"  # the three answers of a yes/no field whose empty value keeps the preset's

SECTION_DATA = "Data"
SECTION_MODEL = "Model and training"
SECTION_REGISTRY = "Registration"
SECTION_CATALOG = "Catalog"
SECTION_TAGGING = "Model and batches"
EMPTY_KEEPS_PRESET = " Leave empty to keep the preset's value."
EMPTY_KEEPS_CONFIG = " Leave empty to keep the configuration's value."


@dataclass(frozen=True)
class FormField:
    """One field of the trigger form: its parameter name, the config key it sets, and how the form shows it.

    Type, bounds, choices and the description come from the config schema, never from here.
    """

    name: str
    key: str
    title: str
    section: str
    examples: tuple[str, ...] = ()
    pattern: str | None = None  # only what the form can check as text; the stages check the rest
    extra: dict[str, Any] = field(default_factory=dict)


# The training DAG's trigger form. `preset` picks the base that the others override.
FORM_FIELDS: tuple[FormField, ...] = (
    FormField("source", "data.source", "Dataset source", SECTION_DATA,
              examples=("kaggle:paramaggarwal/fashion-product-images-dataset", KAGGLE_SMALL,
                        "s3://fashion-data/fashion-dataset", "synthetic:3000"),
              pattern=r"^(kaggle:[\w.-]+/[\w.-]+|s3://[^/\s]+(/\S*)?|synthetic:[1-9][0-9]*|[/~.]\S*)$"),
    FormField("max_rows", "data.max_rows", "Maximum rows", SECTION_DATA),
    FormField("min_class_count", "labels.min_class_count", "Minimum class count", SECTION_DATA),
    FormField("backbone", "model.backbone", "Backbone", SECTION_MODEL,
              examples=("efficientnet_b3", "efficientnet_b0", "tf_efficientnet_lite0", "convnext_tiny", "resnet50"),
              pattern=r"^[a-z0-9_.]+$"),
    FormField("pretrained", "model.pretrained", "Pretrained weights", SECTION_MODEL),
    FormField("image_width", "images.width", "Image width", SECTION_MODEL),
    FormField("image_height", "images.height", "Image height", SECTION_MODEL),
    FormField("epochs", "train.epochs", "Epochs", SECTION_MODEL),
    FormField("batch_size", "train.batch_size", "Batch size", SECTION_MODEL),
    FormField("learning_rate", "train.lr", "Learning rate", SECTION_MODEL),
    FormField("force", "train.force", "Force retraining", SECTION_MODEL),
    FormField("promote", "registry.promote", "Promote", SECTION_REGISTRY),
    FormField("min_delta", "registry.min_delta", "Minimum improvement", SECTION_REGISTRY),
)
PARAM_CONFIG_KEYS: dict[str, str] = {f.name: f.key for f in FORM_FIELDS}

# The tagging DAG's trigger form; its base is the preset $FASHION_TAGGER_PRESET (`default_preset`).
TAGGING_FORM_FIELDS: tuple[FormField, ...] = (
    FormField("source", "tagging.catalog", "Catalog", SECTION_CATALOG),
    FormField("out_dir", "tagging.out_dir", "Tags folder", SECTION_CATALOG),
    FormField("model", "tagging.model", "Model", SECTION_TAGGING, pattern=r"^(models:/\S+|[/~.]\S*)$"),
    FormField("shard_size", "tagging.shard_size", "Shard size", SECTION_TAGGING),
    FormField("batch_size", "tagging.batch_size", "Batch size", SECTION_TAGGING),
)


# --- the trigger form, generated from the config schema -------------------------------------------------------------


def _field_schema(schema: Mapping[str, Any], key: str) -> dict[str, Any]:
    """The JSON schema of config field KEY (`train.epochs`), with `Optional[...]` unwrapped."""
    section, name = key.split(".")
    ref = schema["properties"][section].get("$ref") or schema["properties"][section]["anyOf"][0]["$ref"]
    section_schema = schema["$defs"][ref.rsplit("/", 1)[-1]]
    prop = dict(section_schema["properties"][name])
    for option in prop.pop("anyOf", []):
        if option.get("type") != "null":
            prop = {**option, **prop}
    return prop


def preset_display(name: str) -> str:
    """`demo: tinynet_e, 4 epochs, 48x64, synthetic:3000`: what a preset sets, read from the preset itself.

    The preset's YAML over the schema's defaults, unvalidated: this runs when the DAG file is parsed, where
    validation (which may look up the backbone in timm) would be too heavy.
    """
    from fashion_tagger.core.config_sources import read_config_source

    data = read_config_source(name)
    defaults = Config.model_construct()

    def value(section: str, key: str) -> Any:
        return (data.get(section) or {}).get(key, getattr(getattr(defaults, section), key))

    return (f"{name}: {value('model', 'backbone')}, {value('train', 'epochs')} epochs, "
            f"{value('images', 'width')}x{value('images', 'height')}, {value('data', 'source')}")


def form_params(config_cls: type[Config] = Config) -> dict[str, dict[str, Any]]:
    """The training form as keyword arguments of Airflow `Param`s, generated from CONFIG_CLS's schema and the presets.

    Every field may be left empty (null), which keeps the preset's value; yes/no fields offer a three-way choice
    (keep the preset's value / yes / no) so that "empty" is never shown as "no".
    """
    presets = preset_names()
    params: dict[str, dict[str, Any]] = {
        PRESET_PARAM: {
            "default": default_preset(),
            "type": "string",
            "enum": presets,
            "values_display": {name: preset_display(name) for name in presets},
            "title": "Preset",
            "description": "Base configuration the other fields override.",
            "section": SECTION_DATA,
        }
    }
    params |= field_params(FORM_FIELDS, config_cls)
    params["source"]["default"] = default_source(default_preset())
    return params


def tagging_form_params(config_cls: type[Config] = Config) -> dict[str, dict[str, Any]]:
    """The tagging form (`TAGGING_FORM_FIELDS`) as keyword arguments of Airflow `Param`s, from CONFIG_CLS's schema."""
    return field_params(TAGGING_FORM_FIELDS, config_cls, empty=EMPTY_KEEPS_CONFIG)


def field_params(
    fields: Sequence[FormField], config_cls: type[Config] = Config, *, empty: str = EMPTY_KEEPS_PRESET
) -> dict[str, dict[str, Any]]:
    """One `Param`'s keyword arguments per form field: type, bounds, choices and description from the schema;
    every field may be left empty (null), which EMPTY says keeps the base configuration's value."""
    schema = config_cls.model_json_schema()
    params: dict[str, dict[str, Any]] = {}
    for form_field in fields:
        prop = _field_schema(schema, form_field.key)
        description = (prop.get("description") or prop.get("title") or form_field.title).rstrip(".") + "."
        spec: dict[str, Any] = {"title": form_field.title, "section": form_field.section}
        if prop.get("type") == "boolean":
            spec |= {
                "default": KEEP,
                "type": "string",
                "enum": [KEEP, YES, NO],
                "values_display": {KEEP: "keep the preset's value", YES: "yes", NO: "no"},
                "description": description,
            }
        else:
            spec |= {
                "default": None,
                "type": ["null", prop["type"]],
                "description": description + empty,
            }
            for bound in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength"):
                if bound in prop:
                    spec[bound] = prop[bound]
            if "enum" in prop:
                spec["enum"] = [None, *prop["enum"]]
        if form_field.examples:
            spec["examples"] = list(form_field.examples)
        if form_field.pattern:
            spec["pattern"] = form_field.pattern
        params[form_field.name] = spec | form_field.extra
    return params


# --- trigger parameters -> Config ------------------------------------------------------------------------------------


def kaggle_credentials_available() -> bool:
    """True when the kaggle client would find credentials (environment or kaggle.json)."""
    from fashion_tagger.core.errors import SourceError
    from fashion_tagger.data.sources import check_kaggle_credentials

    try:
        check_kaggle_credentials()
    except SourceError:
        return False
    return True


def default_source(preset: str | None = None) -> str:
    """$FASHION_TAGGER_SOURCE, else Kaggle when credentials exist, else the generated dataset.

    The demo preset takes the 60x80 Kaggle variant (about 0.6 GB); every other preset the full dataset.
    """
    if value := os.environ.get(SOURCE_ENV, "").strip():
        return value
    if kaggle_credentials_available():
        from fashion_tagger.core.config import KAGGLE_FULL

        return KAGGLE_SMALL if preset == "demo" else KAGGLE_FULL
    return SYNTHETIC_DEFAULT


def default_preset() -> str:
    return os.environ.get(PRESET_ENV, "").strip() or "default"


def _param_value(name: str, value: Any) -> Any:
    """A form value as the config wants it: yes/no -> True/False; None, blank and `keep` mean "keep the preset"."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str) and value.strip().lower() in (KEEP, YES, NO):
        answer = value.strip().lower()
        return None if answer == KEEP else answer == YES
    return value


def param_overrides(params: Mapping[str, Any], fields: Sequence[FormField] = FORM_FIELDS) -> dict[str, Any]:
    """Nested config overrides from trigger parameters of the form FIELDS; unknown names are an error, empty values
    are skipped. `preset` names the base they override, which `config_from_params` loads."""
    keys = {f.name: f.key for f in fields}
    unknown = sorted(set(params) - set(keys) - {PRESET_PARAM})
    if unknown:
        raise ConfigError(
            f"unknown parameter(s) {', '.join(unknown)}: the DAG accepts {PRESET_PARAM}, {', '.join(keys)}"
        )
    nested: dict[str, Any] = {}
    for name, key in keys.items():
        value = _param_value(name, params.get(name))
        if value is None:
            continue
        section, field_name = key.split(".")
        nested.setdefault(section, {})[field_name] = value
    return nested


def config_from_params(
    params: Mapping[str, Any], *, fields: Sequence[FormField] = FORM_FIELDS, fixed: Mapping[str, Any] | None = None
) -> Config:
    """Validate trigger parameters of the form FIELDS into a `Config`: the preset (`preset`, else `default_preset`),
    then the parameters, then `fixed` overrides.

    Errors name the parameter as the user typed it, e.g. `epochs (train.epochs): Input should be ...`.
    """
    params = {name: params[name] for name in params}
    preset = params.get(PRESET_PARAM) or default_preset()
    overrides = merge_overrides(param_overrides(params, fields), fixed or {})
    try:
        return load_config(preset, overrides)
    except ConfigError as exc:
        message = str(exc)
        for name, key in ((f.name, f.key) for f in fields):
            message = message.replace(f"{key}:", f"{name} ({key}):")
        raise ConfigError(f"bad parameters: {message}") from None
