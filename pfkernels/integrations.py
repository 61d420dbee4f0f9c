"""Training-framework callbacks that track sharpness with :class:`pfkernels.SharpnessTracker`.

Nothing here is imported by ``import pfkernels``, and this module imports neither framework
until a callback class is asked for (``lightning`` and ``transformers`` take seconds to import
and are optional):

- ``SharpnessCallback``: PyTorch Lightning (``lightning`` or ``pytorch_lightning``); also
  reachable as ``pfkernels.eos.SharpnessCallback``.
- ``SharpnessTrainerCallback``: Hugging Face ``transformers.Trainer``.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Callable

from .eos import _SCALARS, SharpnessTracker

__all__ = ["SharpnessCallback", "SharpnessTrainerCallback"]  # noqa: F822 (module __getattr__)


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    return {f"eos/{key}": float(record[key]) for key in _SCALARS if record[key] is not None}


def _lightning_callback_class():
    if importlib.util.find_spec("lightning") is not None:
        from lightning.pytorch import Callback
    elif importlib.util.find_spec("pytorch_lightning") is not None:
        from pytorch_lightning import Callback
    else:
        raise AttributeError(
            "SharpnessCallback needs lightning (pip install lightning); it is not importable here"
        )

    class SharpnessCallback(Callback):
        """Lightning callback: a :class:`SharpnessTracker` stepped after every training batch.

        ``SharpnessCallback(loss_fn, data, **tracker_kwargs)``; the tracker is built at the first
        batch from the LightningModule and the trainer's first optimizer (unless ``optimizer=``
        or ``threshold=`` is given), and each record is logged with ``pl_module.log_dict`` under
        ``eos/...``. ``callback.tracker`` holds it (history, summary).
        """

        def __init__(self, loss_fn: Callable, data, **tracker_kwargs):
            super().__init__()
            self.loss_fn, self.data, self.tracker_kwargs = loss_fn, data, tracker_kwargs
            self.tracker: SharpnessTracker | None = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if self.tracker is None:
                kwargs = dict(self.tracker_kwargs)
                if "threshold" not in kwargs and "optimizer" not in kwargs and trainer.optimizers:
                    kwargs["optimizer"] = trainer.optimizers[0]
                self.tracker = SharpnessTracker(pl_module, self.loss_fn, self.data, **kwargs)
            record = self.tracker.step(trainer.global_step)
            if record is not None:
                pl_module.log_dict(_scalars(record))

    return SharpnessCallback


def _trainer_callback_class():
    if importlib.util.find_spec("transformers") is None:
        raise AttributeError("SharpnessTrainerCallback needs transformers (pip install "
                             "transformers); it is not importable here")
    from transformers import TrainerCallback

    class SharpnessTrainerCallback(TrainerCallback):
        """Hugging Face ``Trainer`` callback: a :class:`SharpnessTracker` on the trained model.

        ``SharpnessTrainerCallback(data, loss_fn=None, **tracker_kwargs)``: ``data`` a fixed
        batch or list of batches (mappings as the Trainer feeds the model, with ``labels``; a
        DataLoader of them also works), ``loss_fn=None`` for the model's own ``.loss`` (or a
        loss of :mod:`pfkernels.losses`, e.g. for float64), the rest as for the tracker
        (``every``, ``k``, ``curvature``, ``sinks``, ...). The tracker is built at the start of
        training from the Trainer's model and optimizer (the stability threshold is then the
        optimizer's, preconditioned for AdamW, unless ``threshold=`` is given) and steps before
        every optimizer step, so each measurement is of the parameters the coming update sees.
        The latest record's ``eos/...`` scalars are added to the Trainer's logs at its next
        logging step. ``callback.tracker`` holds the tracker (history, summary).
        """

        def __init__(self, data, loss_fn: Callable | None = None, **tracker_kwargs):
            self.data, self.loss_fn, self.tracker_kwargs = data, loss_fn, tracker_kwargs
            self.tracker: SharpnessTracker | None = None
            self._unlogged: dict[str, Any] | None = None

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            if self.tracker is None:
                options = dict(self.tracker_kwargs)
                if "threshold" not in options and "optimizer" not in options \
                        and optimizer is not None:
                    options["optimizer"] = getattr(optimizer, "optimizer", optimizer)
                self.tracker = SharpnessTracker(model, self.loss_fn, self.data, **options)

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            record = self.tracker.step(state.global_step)
            if record is not None:
                self._unlogged = record

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self._unlogged is not None and logs is not None:
                logs.update(_scalars(self._unlogged))
                self._unlogged = None

    return SharpnessTrainerCallback


def __getattr__(name: str):
    # Defined lazily: importing lightning or transformers costs seconds, both optional.
    if name == "SharpnessCallback":
        return _lightning_callback_class()
    if name == "SharpnessTrainerCallback":
        return _trainer_callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
