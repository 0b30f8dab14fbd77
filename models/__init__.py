"""Models: GPT-2 and CIFAR-style ResNets, each with a settings-driven builder."""

from .gpt2 import GPT, GPT2_VOCAB_SIZE, GPT_PRESETS, GPTConfig, build_gpt2
from .resnet import BasicBlock, Bottleneck, ResNet, build_resnet, resnet18, resnet50

__all__ = [
    "GPT", "GPTConfig", "GPT_PRESETS", "GPT2_VOCAB_SIZE", "build_gpt2",
    "ResNet", "BasicBlock", "Bottleneck", "resnet18", "resnet50", "build_resnet",
]
