"""The benchmark app's sweeper: Hydra's basic sweeper, composing each job's config once instead of twice.

Hydra's `BasicSweeper` composes every job's config before launching the batch (so that a bad override fails
the sweep before any job runs), and its launcher then composes it again to run it. Composition costs about
0.2 CPU-s a job (Hydra re-reads and merges the YAML files), a tenth of a toy job. `ComposeOnceSweeper` keeps
the check and hands the configs it composed to the launcher, which gets each one once instead of composing
it again; a config it did not compose (another launcher asking twice) is composed as before.

Hydra finds plugins only in the `hydra_plugins` namespace package, hence this folder at the repository root;
`conf/config.yaml` selects the sweeper (`hydra.sweeper._target_`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class ComposedConfigs:
    """A config loader that hands out each job's config composed by the sweeper's check, once; anything else
    goes to Hydra's loader."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.kept: dict[tuple[str, ...], DictConfig] = {}

    def compose_and_keep(self, master_config: DictConfig, overrides: Sequence[str]) -> None:
        self.kept[tuple(overrides)] = self.loader.load_sweep_config(master_config, list(overrides))

    def load_sweep_config(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        kept = self.kept.pop(tuple(sweep_overrides), None)
        return kept if kept is not None else self.loader.load_sweep_config(master_config, sweep_overrides)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


class ComposeOnceSweeper(BasicSweeper):
    """`BasicSweeper` (same settings: `max_batch_size`, `params`) whose launcher reuses the configs composed
    while checking a batch."""

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        """`BasicSweeper.setup` with Hydra's config loader behind `ComposedConfigs`: the launcher it instantiates
        (and the sweep's override parser) see the kept configs."""
        self.configs = ComposedConfigs(hydra_context.config_loader)
        kept = HydraContext(config_loader=self.configs, callbacks=hydra_context.callbacks)  # type: ignore[arg-type]
        super().setup(hydra_context=kept, task_function=task_function, config=config)

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        """Compose every job of the batch now (a bad override fails the sweep before any job runs) and keep the
        configs for the launcher."""
        assert self.config is not None
        for overrides in batch:
            self.configs.compose_and_keep(self.config, overrides)
