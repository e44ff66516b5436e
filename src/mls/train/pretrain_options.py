"""``PretrainOptions``: the keyword options of ``mls.train.pretrain``, typed for editors and type checkers.

One key per field of ``mls.train.settings.SETTINGS`` (``MLSConfig``, ``ViewConfig``, ``TrainConfig``), of the
field's type or None; a key left out or None takes the preset's value. The settings are declared in those
dataclasses; the class below is written from them by ``pretrain_options_source()`` and never edited by hand.
After adding, renaming or retyping a setting, rewrite it with

    python -c "from mls.train.pretrain_options import write_pretrain_options as w; w()"

(tests/test_pretrain_options.py fails until the two agree). It is source, not a class built at import, because
type checkers read a ``TypedDict`` only from source: mypy refuses one built from a computed dict, and then every
keyword of a function typed with it (docs/architecture.md, "Settings").
"""
from pathlib import Path
from typing import Literal, TypedDict

_DOC = "The settings ``mls.train.pretrain`` takes as keywords (left out or None: the preset's value)."


def pretrain_options_source() -> str:
    """The source of ``PretrainOptions`` as the fields of ``SETTINGS`` declare it (``mls.command_options``)."""
    from mls.command_options import typed_dict_source
    from mls.train.settings import SETTINGS

    return typed_dict_source("PretrainOptions", SETTINGS, _DOC)


_WRITTEN = "# Written by pretrain_options_source(): do not edit.\n"


def write_pretrain_options(path: Path = Path(__file__)) -> bool:
    """Replace the class after the ``_WRITTEN`` line of ``path`` (this module) with ``pretrain_options_source()``;
    whether the file changed."""
    text = path.read_text(encoding="utf-8")
    written = text[:text.index(_WRITTEN) + len(_WRITTEN)] + pretrain_options_source()
    if written != text:
        path.write_text(written, encoding="utf-8")
    return written != text


# Written by pretrain_options_source(): do not edit.
class PretrainOptions(TypedDict, total=False):
    """The settings ``mls.train.pretrain`` takes as keywords (left out or None: the preset's value)."""

    # mls.method.settings.MLSConfig
    arch: str | None
    small_stem: bool | None
    method: Literal["mocov2", "mls"] | None
    mls_loss: Literal["bce", "bce_pos", "knn"] | None
    select_from: Literal["g", "z"] | None
    logits_from: Literal["z", "g"] | None
    topk: int | None
    queue_size: int | None
    dim: int | None
    tau: float | None
    momentum: float | None
    extra_weight: float | None
    extra_tau: float | None
    bce_balanced: bool | None
    logit_bias: Literal["none", "fixed", "learned"] | None
    mask_positives: bool | None
    shuffle_bn: bool | None
    queue_g_dtype: Literal["float32", "bfloat16", "float16"] | None
    store_g: bool | None

    # mls.data.augment.ViewConfig
    image_size: int | None
    min_scale: float | None
    hue: float | None
    grayscale_p: float | None
    blur: bool | None

    # mls.train.settings.TrainConfig
    data: str | None
    annotations: str | None
    num_images: int | None
    batch_size: int | None
    epochs: int | None
    max_steps: int | None
    lr: float | None
    weight_decay: float | None
    sgd_momentum: float | None
    warmup_epochs: float | None
    extra_start_epoch: float | None
    extra_ramp_epochs: float | None
    extra_after_full_queue: bool | None
    workers: int | None
    devices: int | str | None
    num_nodes: int | None
    strategy: str | None
    precision: Literal["32", "bf16-mixed", "16-mixed"] | None
    sync_bn: bool | None
    channels_last: bool | None
    augment_on: Literal["auto", "cpu", "device"] | None
    compile: str | None
    save_every: int | None
    max_failed_share: float | None
    on_collapse: Literal["warn", "stop"] | None
    monitor: str | None
    monitor_every: int | None
    monitor_images: int | None
    monitor_split: float | None
    log_every: int | None
    logger: str | list[str] | None
    project: str | None
    run_name: str | None
    progress: Literal["auto", "bar", "lines", "off"] | None
    seed: int | None
