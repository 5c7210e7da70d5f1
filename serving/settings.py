"""Gateway settings (pydantic-settings): defaults < config file < ``CLEANPLATE_*`` environment < CLI options.

The config file is JSON, TOML or YAML (by suffix), named by ``CLEANPLATE_CONFIG`` or ``cleanplate serve
--config``; its keys are the field names below. Lists in the environment are JSON, e.g.
``CLEANPLATE_API_KEYS='["k1","k2"]'``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import (
    BaseSettings,
    JsonConfigSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

from cleanplate.admission import MiB
from cleanplate.engines import EngineOptions
from cleanplate.errors import ErrorCode, InputError

CONFIG_ENV = "CLEANPLATE_CONFIG"
_config_file: Path | None = None  # set by load_settings for the duration of one Settings() call


class Settings(BaseSettings, EngineOptions):
    """Everything the gateway reads at start-up: the engine's options (:class:`cleanplate.engines.EngineOptions`,
    inherited) and the gateway's own. Sizes in bytes, times in seconds unless named ``_ms``."""

    model_config = SettingsConfigDict(env_prefix="CLEANPLATE_", extra="forbid")

    host: str = Field("127.0.0.1", description="bind address (0.0.0.0 inside a container)")
    port: int = Field(8080, ge=0, le=65535)
    request_timeout_s: float = Field(120.0, gt=0, description="per-request deadline (504 past it)")
    body_timeout_s: float = Field(30.0, gt=0, description="time allowed to upload a request body (408 past it)")
    max_upload_bytes: int = Field(32 * MiB, ge=1024, description="request body limit (413)")
    max_pixels: int = Field(40_000_000, ge=1, description="per-image pixel limit, checked before decoding (413)")
    memory_budget_mib: int | None = Field(None, ge=16, description="working memory of the requests in flight "
                                          "(admission; default: memory_limit_mib - memory_reserve_mib, or 1024)")
    memory_limit_mib: int | None = Field(None, ge=64, description="the container's memory limit (the Helm chart "
                                         "sets it from the pod spec); derives memory_budget_mib")
    memory_reserve_mib: int = Field(1024, ge=0, description="memory kept outside the budget for the model, "
                                    "the runtime and allocator slack")

    api_keys: list[SecretStr] = Field(default_factory=list, description="Bearer keys; empty = no auth")
    quality_gate: bool = Field(False, description="gate removals by default (requests may override)")
    max_attempts: int = Field(3, ge=1, le=16, description="gate attempts by default")
    max_attempts_limit: int = Field(8, ge=1, le=64, description="largest max_attempts a request may ask for")

    @property
    def memory_budget_bytes(self) -> int:
        """The admission budget in bytes: ``memory_budget_mib``, else the limit minus the reserve (at least
        256 MiB), else 1024 MiB."""
        if self.memory_budget_mib is not None:
            return self.memory_budget_mib * MiB
        if self.memory_limit_mib is not None:
            return max(self.memory_limit_mib - self.memory_reserve_mib, 256) * MiB
        return 1024 * MiB

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources = [init_settings, env_settings]
        path = _config_file or os.environ.get(CONFIG_ENV)
        if path:
            sources.append(_file_source(settings_cls, Path(path)))
        return tuple(sources)


def _file_source(settings_cls: type[BaseSettings], path: Path) -> PydanticBaseSettingsSource:
    if not path.is_file():
        raise InputError(f"config file not found: {path}", code=ErrorCode.BAD_OPTION)
    suffix = path.suffix.lower()
    if suffix == ".json":
        return JsonConfigSettingsSource(settings_cls, json_file=path)
    if suffix == ".toml":
        return TomlConfigSettingsSource(settings_cls, toml_file=path)
    if suffix in (".yaml", ".yml"):
        return YamlConfigSettingsSource(settings_cls, yaml_file=path)
    raise InputError(f"config file must be .json, .toml or .yaml: {path}", code=ErrorCode.BAD_OPTION)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Settings from the sources above; ``overrides`` (None values skipped) win over everything.

    Raises InputError naming the first bad field (the CLI prints it and exits 2).
    """
    global _config_file
    _config_file = config_file
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(map(str, err["loc"])) or "settings"
        raise InputError(f"settings: {where}: {err['msg']}", code=ErrorCode.BAD_OPTION) from exc
    except ValueError as exc:  # a config file that does not parse
        raise InputError(f"settings: {exc}", code=ErrorCode.BAD_OPTION) from exc
    finally:
        _config_file = None
