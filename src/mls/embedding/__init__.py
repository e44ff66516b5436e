"""Using a pretrained backbone's features: every image of a collection embedded once (``mls embed``), then
searched for its nearest images (``mls search``)."""
