"""Checkpoints written by earlier versions of mls, and their translation into this version's layout.

Every loader of a pretraining checkpoint (``mls.checkpoints.pretrained.load_pretrained``, ``load_backbone`` and
``backbone_info``: export, eval, transfer, the figures and the study) reads it through ``upgrade``; the
rest of the code sees the layout of this version only. What each version wrote, and what changed:

- **0.2** (no ``mls_version``): ``hyper_parameters["model"]`` holds the keyword arguments of its ``MLS``
  under its own names, ``bce_weight`` and ``bce_tau`` (now ``extra_weight`` and ``extra_tau``, as they
  weight and cool the k-NN and BCE-pos losses too), and only the settings it was given: the others
  meant its defaults, unlike this version's (D 65,536, dz 128, m 0.999, λ 1). It also held
  ``extra_after_full_queue``, a training setting since 0.3, which the model ignores. Its training
  settings (``lr``, ``total_steps``, ...) lie beside ``model`` rather than under ``train``; no loader
  reads them. ``data`` has no ``fingerprint``.
- **0.3**: ``mls_version``; ``model`` holds every ``MLSConfig`` field under the names of today, and
  ``train``, ``view``, ``steps_per_epoch``, ``total_batch`` and ``data`` the rest. Nothing to translate.
  ``data`` has a ``fingerprint`` only from late 0.3.0 builds on.
- **0.4** and **0.5**: as 0.3, always with the data's ``fingerprint``. Nothing to translate.
- **0.6** and **0.7**: this layout (0.7 adds the data module's split of its epochs, ``PretrainData``, which
  a resumed run compares when it goes on in the middle of an epoch).

A ``data`` without ``fingerprint`` is left so: the commands that compare data (``mls visualize``,
``--resume``) do not check it. State-dict keys (``model.`` + the ``MLS`` module's) have not changed
since 0.2, and the queue's fields were ``z``, ``index``, ``box`` and, when kept, ``g`` throughout. A
checkpoint of a newer mls than this one is refused, naming its version.
"""
from __future__ import annotations

import os

import mls

OLDEST = "0.2"  # the version of a checkpoint without ``mls_version``
# Names used by mls 0.2 for settings of the model that were renamed in 0.3.
RENAMED_0_2 = {"bce_weight": "extra_weight", "bce_tau": "extra_tau"}
# Defaults of mls 0.2's MLS that differ from this version's, under this version's names, for the
# settings a 0.2 checkpoint did not store.
DEFAULTS_0_2 = {"queue_size": 65536, "dim": 128, "momentum": 0.999, "extra_weight": 1.0}


def version_tuple(text: str) -> tuple[int, ...]:
    """``"0.5.0"`` -> ``(0, 5)``: major and minor, which decide a checkpoint's layout."""
    return tuple(int(part) for part in text.split(".")[:2])


def written_by(checkpoint: dict) -> str:
    """The mls version that wrote a pretraining checkpoint (``0.2`` when it does not say)."""
    return checkpoint["hyper_parameters"].get("mls_version", OLDEST)


def upgrade(checkpoint: dict, path: str | os.PathLike = "the checkpoint") -> dict:
    """A pretraining checkpoint of any mls from 0.2 on, in this version's layout (see the module docstring).

    Returns a new dict (the argument is left as it was); ``hyper_parameters`` keep ``mls_version`` as
    written, or without it for 0.2, so upgrading an upgraded checkpoint changes nothing. A checkpoint of a
    newer mls is refused with a ``ValueError`` naming ``path`` and its version.
    """
    version = written_by(checkpoint)
    if version_tuple(version) > version_tuple(mls.__version__):
        raise ValueError(f"{path} was written by mls {version}, newer than this mls {mls.__version__}: "
                         "upgrade mls to read it")
    hyper = checkpoint["hyper_parameters"]
    model = {RENAMED_0_2.get(name, name): value for name, value in hyper["model"].items()}  # no later name clashes
    if version_tuple(version) < (0, 3):
        model = {**DEFAULTS_0_2, **model}
    return {**checkpoint, "hyper_parameters": {**hyper, "model": model}}
