"""Figures: nearest neighbours in ``Q_g`` (supplement Fig. 5-6) and training curves."""
