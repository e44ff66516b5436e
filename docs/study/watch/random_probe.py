"""Probe scores of a randomly initialised ResNet-18 on a VOC-layout part, as `mls study` scores its cells
(linear probe and k-NN on the validation split carved from trainval), at two seeds.

    python docs/study/watch/random_probe.py datasets/photos/tuning 64 false   # PART IMAGE_SIZE SMALL_STEM
"""
import json
import sys

from mls.eval.datasets import load_dataset, validation_split
from mls.eval.metrics import classification_metrics
from mls.eval.probes import Task, knn_classify, linear_probe

part, size, small = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "true"
scores = {}
for seed in (0, 1):
    task = Task("random", "resnet18", small, validation_split(load_dataset("voc07", part)), size, 256, 2)
    scores[seed] = {"map": classification_metrics(*linear_probe(task, seed, epochs=100), True)["mAP"],
                    "knn_map": classification_metrics(*knn_classify(task, seed), True)["mAP"]}
print(json.dumps(scores))
