"""A Hydra multirun of a stub task through the app's sweeper (`conf/config.yaml`'s `hydra.sweeper`), run by
Hydra's own `Hydra.multirun` in a process of its own, that records what happened as JSON:

    python -m tests.sweep_multirun CONF_DIR OUT_JSON OVERRIDE...

`composed`: the job overrides Hydra's config loader composed a job config for (it is handed to Hydra wrapped in
`CountingLoader`, as Hydra's constructor takes any loader); `jobs`: what each job's task function saw, with the
launcher that ran it (`hydra.launcher`, as the job's Hydra config names it) and its number in the sweep.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hydra import version
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.hydra import Hydra
from hydra._internal.utils import create_config_search_path
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

RECORD: dict[str, list[Any]] = {"composed": [], "jobs": []}


class CountingLoader:
    """Hydra's config loader, each job config it composes recorded."""

    def __init__(self, loader: ConfigLoaderImpl) -> None:
        self.loader = loader

    def load_sweep_config(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        RECORD["composed"].append(list(sweep_overrides))
        return self.loader.load_sweep_config(master_config, sweep_overrides)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


def task(cfg: DictConfig) -> None:
    hydra = HydraConfig.get()
    RECORD["jobs"].append({"x": cfg.x, "y": cfg.y, "overrides": list(hydra.overrides.task), "num": hydra.job.num,
                           "launcher": hydra.launcher._target_})


def main() -> None:
    conf_dir, out, *overrides = sys.argv[1:]
    version.setbase("1.3")
    loader = CountingLoader(ConfigLoaderImpl(config_search_path=create_config_search_path(conf_dir)))
    hydra = Hydra(task_name="stub", config_loader=loader)  # type: ignore[arg-type]
    hydra.multirun(config_name="config", task_function=task, overrides=overrides)
    Path(out).write_text(json.dumps(RECORD))


if __name__ == "__main__":
    main()
