"""DeepSpeed checkpoints loaded without unpickling code: its torch checkpoint engine with weights_only=True.

DeepSpeed's own engine (`deepspeed/runtime/checkpoint_engine/torch_checkpoint_engine.py`) loads every
ZeRO file with weights_only=False, i.e. a full unpickle: a planted file in a run's
checkpoint folder would run code on resume. The files a ZeRO-2/3 run writes hold tensors, plain
containers and three DeepSpeed classes (`LossScaler`, `ZeroStageEnum`, `fragment_address`: what
`torch.serialization.get_unsafe_globals_in_checkpoint` lists over every file of our DDP/ZeRO-2/ZeRO-3
test runs), so loading them with `weights_only=True` and those allow-listed loses nothing. A file
that needs anything else is refused with torch's error naming the global, prefixed with the file.
"""
from __future__ import annotations

import pickle

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine


def _deepspeed_safe_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            try:
                return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as refused:
                raise pickle.UnpicklingError(f"{path}: {refused}") from None


def use_weights_only_loading(engine) -> None:
    """Swap a DeepSpeed engine's torch checkpoint engine (the default) for the weights-only one; any other
    engine (a user's JSON choosing e.g. the Nebula or fast engine) is left alone and named at load."""
    if type(engine.checkpoint_engine) is TorchCheckpointEngine:
        replacement = WeightsOnlyCheckpointEngine.__new__(WeightsOnlyCheckpointEngine)
        replacement.__dict__.update(engine.checkpoint_engine.__dict__)  # same settings (zipfile serialization, ...)
        engine.checkpoint_engine = replacement
