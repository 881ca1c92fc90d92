"""Inference settings (``FLP_INFERENCE_*``) and the per-application runtime built from them."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from flplatform.uncertainty import InputLimits


class InferenceSettings(BaseSettings):
    """Limits of the inference endpoint (environment variables ``FLP_INFERENCE_*``)."""

    model_config = SettingsConfigDict(env_prefix="FLP_INFERENCE_", env_file=".env", extra="ignore")

    max_batch: int = Field(default=1024, ge=1, description="Most input rows per request.")
    max_samples: int = Field(default=100, ge=2, description="Largest N for MC_DROPOUT and SWAG.")
    max_input_bytes: int = Field(default=64 * 1024**2, ge=1024, description="Largest decoded model_input.")
    max_input_elements: int = Field(default=16 * 1024**2, ge=1, description="Most numbers in model_input.")
    max_image_pixels: int = Field(default=16 * 1024**2, ge=1)
    max_ensemble_members: int = Field(default=32, ge=1)
    max_concurrent: int = Field(default=2, ge=1, description="Inferences computed at once per process.")

    def limits(self) -> InputLimits:
        return InputLimits(
            max_bytes=self.max_input_bytes,
            max_elements=self.max_input_elements,
            max_image_pixels=self.max_image_pixels,
        )


@dataclass
class ModuleStats:
    """How often the sandbox already held every module an inference needed (``hits``) and how
    many modules had to be sent to it (``misses``); the modules live in the sandbox workers
    (``FLP_SANDBOX_CACHE_*``), never in this process."""

    hits: int = 0
    misses: int = 0


@dataclass
class InferenceRuntime:
    """Per-application state: limits, the module cache and the concurrency gate."""

    settings: InferenceSettings
    cache: ModuleStats
    gate: asyncio.Semaphore

    @classmethod
    def create(cls, settings: InferenceSettings | None = None) -> InferenceRuntime:
        settings = settings or InferenceSettings()
        return cls(settings=settings, cache=ModuleStats(), gate=asyncio.Semaphore(settings.max_concurrent))


def runtime_for(state: Any) -> InferenceRuntime:
    """The runtime kept on ``app.state`` (created on first use; tests may preset
    ``app.state.inference_settings`` or the runtime itself)."""
    runtime = getattr(state, "inference_runtime", None)
    if runtime is None:
        runtime = InferenceRuntime.create(getattr(state, "inference_settings", None))
        state.inference_runtime = runtime
    return runtime
