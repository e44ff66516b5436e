"""Pretraining data: two MoCo-v2 views per image, reproducible per (seed, epoch, image).

The views of an image depend only on the run's seed, the epoch and the image index, not
on the worker or rank that makes them, nor on whether the run was resumed: ``SeededLoader``
(``mls.train.data_order``) hands out ``(epoch, index)`` keys and each sample seeds its own random
draws. A run resumed in the middle of an epoch skips the keys that epoch had already trained on,
so that it goes on exactly as the uninterrupted run would have.
"""
from __future__ import annotations

import torch

from mls.data.augment import MoCoV2View, TwoViewDataset
from mls.data.device_views import WorkerView, apply_appearance, collate_views
from mls.data.sources import open_source
from mls.train.data_order import SeededLoader

AUGMENT_ON = ("cpu", "device")


class PretrainData(SeededLoader):
    """Images from a folder (or the built-in synthetic scenes) as pairs of views (MoCo-v2's by default).

    ``augment_on="device"``: the workers only decode, crop and flip, and send uint8 views with the
    random parameters of the rest of ``view``, applied to the batch once it is on the training device
    (``on_after_batch_transfer``, ``mls.data.device_views``); the views are the CPU path's, up to
    rounding. Either way the training step receives normalised float views.
    """

    def __init__(
        self,
        data: str | None = None,
        annotations: str | None = None,
        num_images: int = 2000,
        image_size: int = 64,
        batch_size: int = 64,
        workers: int = 2,
        seed: int = 0,
        view: MoCoV2View | None = None,
        augment_on: str = "cpu",
    ):
        if augment_on not in AUGMENT_ON:
            raise ValueError(f"augment_on must be one of {AUGMENT_ON}, got {augment_on!r}")
        self.settings = dict(data=data, annotations=annotations, image_size=image_size, batch_size=batch_size,
                             workers=workers, seed=seed, augment_on=augment_on)
        self.source = open_source(data, annotations=annotations, num_images=num_images, image_size=image_size,
                                  seed=seed)
        view = view or MoCoV2View(size=image_size)
        self._normalize = view.normalize
        if augment_on == "device":
            views = TwoViewDataset(self.source, WorkerView(view), tensors=True)
        else:
            views = TwoViewDataset(self.source, view)
        super().__init__(views, batch_size, seed, workers,
                         collate_fn=collate_views if augment_on == "device" else None)

    def describe(self) -> dict:
        """What the figures need to find the images again, and a fingerprint to recognise them by."""
        s = self.settings
        return {"data": s["data"], "annotations": s["annotations"], "num_images": len(self.source),
                "image_size": s["image_size"], "seed": s["seed"], "fingerprint": self.source.fingerprint()}

    def labels(self) -> torch.Tensor | None:
        return self.source.multi_hot()

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """With ``augment_on="device"``: colour jitter, grayscale, blur and normalisation of both views, here.

        Here rather than in the module: the batch format and its completion stay in one place, and
        Lightning warns on every fit when a module overrides this hook next to a data module.
        """
        if self.settings["augment_on"] == "device":
            for n in (1, 2):
                batch[f"view{n}"] = apply_appearance(batch[f"view{n}"], batch.pop(f"appearance{n}"), self._normalize)
        return batch
