"""``mls embed`` and ``mls search``: every option a documented field of a settings dataclass
(``mls.embedding.settings``), so that the signature, ``--help`` and the keywords in Python come from one place."""
from __future__ import annotations

from mls.command_options import CommandSettings
from mls.embedding.embed import embed_collection
from mls.embedding.settings import EmbedRun, EmbedSettings, SearchSettings
from mls.embedding.similar import search_embeddings

EMBED = CommandSettings((EmbedSettings, EmbedRun))
SEARCH = CommandSettings((SearchSettings,))


@EMBED.options
def embed(**options) -> dict:
    """Embed every image of a folder or shard set with a pretrained backbone, resumably; `mls search` reads the output.

    Writes OUT/embeddings.safetensors (or .npy), OUT/paths.csv (the images in the same order) and
    OUT/skipped.csv (unreadable images); a run killed midway is resumed by the same command.
    """
    settings, run = EMBED.settings(options)
    return embed_collection(settings, run)


@SEARCH.options
def search_images(**options) -> dict:
    """The nearest embedded images of query images (--query) or of every embedded image (--all), by cosine.

    Writes OUT/neighbors.csv (query, rank, neighbor, cosine) and OUT/neighbors.png (a contact sheet).
    """
    settings, = SEARCH.settings(options)
    return search_embeddings(settings)
