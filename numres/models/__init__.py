"""Model families built from numres.nn layers."""
from .cifar import (CIFAR_MODELS, CifarResNet, PlainBlock, ZeroPadShortcut, plain20, plain32, plain44, plain56,
                    plain110, resnet20, resnet32, resnet44, resnet56, resnet110)
from .resnet import (BasicBlock, Bottleneck, ResNet, resnet18, resnet34, resnet50, resnet101, resnet152,
                     resnext50_32x4d, resnext101_32x8d, wide_resnet50_2, wide_resnet101_2)

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
           "resnext50_32x4d", "resnext101_32x8d", "wide_resnet50_2", "wide_resnet101_2",
           "CIFAR_MODELS", "CifarResNet", "PlainBlock", "ZeroPadShortcut", "resnet20", "resnet32", "resnet44",
           "resnet56", "resnet110", "plain20", "plain32", "plain44", "plain56", "plain110"]
