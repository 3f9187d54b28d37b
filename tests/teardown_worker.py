"""One rank of a short real DDP run (our DDPBackend, a DDP-wrapped module, gloo), ended the way the entry
point ends a multi-process run — or, with `--plain-exit`, the way it used to (destroy_process_group,
then interpreter teardown). Used by tests/test_process_reliability.py to loop clean exits."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's helios_train

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from helios_train.backends.ddp import DDPBackend  # noqa: E402
from helios_train.config import LauncherConfig, TrainerConfig  # noqa: E402
# The trainer's module imports the framework (diffusers, transformers, PEFT): the process then holds what a
# trainer holds at exit. With a bare torch worker the old exit never hung here (0 of 45); with the framework
# imported it hung in 2 of 30 launches.
import diffusers  # noqa: E402,F401
import peft  # noqa: E402,F401
import transformers  # noqa: E402,F401

import helios_train.training.trainer  # noqa: E402,F401


def main() -> None:
    from helios_train.runtime.process_guard import will_exit_without_teardown

    if "--plain-exit" not in sys.argv:
        will_exit_without_teardown()
    launcher = OmegaConf.structured(LauncherConfig(name="ddp", backend="gloo"))
    trainer = OmegaConf.structured(TrainerConfig(device="cpu", collective_timeout_s=60))
    backend = DDPBackend(launcher, trainer)
    module = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    role = backend.prepare("generator", module, opt, None, 1.0)
    for step in range(3):  # DDP's reducer has buckets and pending work objects, as in training
        loss = role.model(torch.randn(8, 64, generator=torch.Generator().manual_seed(step))).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        backend.all_sum([float(loss)])
    backend.shutdown()
    print(f"rank {backend.rank} done", flush=True)
    if "--plain-exit" in sys.argv:
        return
    from helios_train.runtime.process_guard import exit_process

    exit_process(0)


if __name__ == "__main__":
    main()
