"""Classification protocols of the paper (supplement A.1, A.3): linear probe, fine-tuning and k-NN.

``datasets`` reads each data set's official layout, ``metrics`` gives top-1 and mAP, ``probes`` and
``finetune`` train and score, ``results`` averages the runs, ``commands`` is ``mls eval``.
"""
