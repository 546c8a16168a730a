#!/usr/bin/env python3
"""Distill any timm teacher into any timm student with Invariant Consistency Distillation (ICD).

    accelerate launch train_icd.py --teacher resnet50 --student mobilenetv3_small_100 --dataset uoft-cs/cifar100

All logic lives in the timm_icd package; see ``train_icd.py --help`` for the flags.
"""
import sys

from timm_icd.cli.train import main

if __name__ == '__main__':
    sys.exit(main())
