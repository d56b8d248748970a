"""Model zoo: CIFAR ResNets, VGG-16-BN, GoogLeNet, MobileNetV2, torchvision classifiers and timm models.

``registry`` registers and looks up constructors by name; ``factory.create_model`` builds a model by name.
"""

from amas.models.cifar_resnet import ShortcutA
from amas.models.factory import create_model
from amas.models.registry import list_models, register_model

__all__ = ["ShortcutA", "create_model", "list_models", "register_model"]
