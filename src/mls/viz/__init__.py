"""Figures: nearest neighbours in ``Q_g`` (supplement Fig. 5-6), score histograms (main paper Fig. 3) and
training curves."""
