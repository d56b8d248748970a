"""Model zoo: CIFAR ResNets, VGG-16-BN, GoogLeNet, MobileNetV2, any torchvision classifier and any timm model."""

# Importing each family registers its constructors.
from amas.models import cifar_resnet, googlenet, mobilenetv2, vgg  # noqa: E402,F401
from amas.models.cifar_resnet import ShortcutA  # noqa: E402
from amas.models.registry import create_model, list_models, register_model

__all__ = ["ShortcutA", "create_model", "list_models", "register_model"]
