#!/usr/bin/env python3
"""Writes weights/imagenet_classes.txt: the 1000 ImageNet-1k class names in
index order, as torchvision's weight metadata lists them (offline: they ship
inside the torchvision package). Rerun: python weights/make_imagenet_classes.py"""
import os

import torchvision

names = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
assert len(names) == 1000
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet_classes.txt"), "w") as f:
    f.write("\n".join(names) + "\n")
