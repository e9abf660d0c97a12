"""Model zoo: ANN teachers, spiking students, STARS feature taps, checkpoints.

    teacher = load_teacher("resnet34", "cifar10_resnet34.pth", num_classes=10)   # Fast-Datafree file
    student = build_student("s_resnet18", num_classes=10, T=4, neuron="lif")
    logits, taps = teacher(x, return_taps=True)    # taps: list of [B, C_l], one per stage
    frozen = fold_bn(student)                      # synthesis step: frozen, BN folded into the convs

Default STARS layers (the paper leaves the set S open; docs/design.md section 4): the output of
every stage, taken before the activation - teacher pre-ReLU after BN and the residual add,
student pre-LIF (the input of the stage's last neuron) - i.e. all the taps of
`model(x, return_taps=True)`, paired in order. Per pair (PAIRS), the tapped layers and channels:

    teacher     student      tapped layers (both nets)              channels
    vgg16       s_vgg16      block0..block4 output (its last BN)    64, 128, 256, 512, 512
    resnet34    s_resnet18   layer1..layer4 output (last block)     64, 128, 256, 512
    resnet19    s_resnet19   layer1..layer3 output (last block)     128, 256, 512
    resnet20    s_resnet20   layer1..layer3 output (last block)     16, 32, 64
    digits_cnn  digits_snn   stages.0..stages.2 output (BN)         16, 32, 64

(The STARS loss accepts different teacher and student channel counts; these pairs happen to agree.)
"""
from .checkpoints import (CheckpointMismatchError, load_state_dict_strict, load_student, load_teacher, save_checkpoint,
                          save_student, verify_checkpoint)
from .inference import fold_bn, freeze
from .students import STUDENTS, Spiking, SpikingNet, build_student
from .teachers import TEACHERS, TapNet, build_teacher

# the paper's teacher -> student pairs (Tables 1-2, 5-6) and the offline default, keyed by student
PAIRS = {
    "s_vgg16": "vgg16",
    "s_resnet18": "resnet34",
    "s_resnet19": "resnet19",
    "s_resnet20": "resnet20",
    "digits_snn": "digits_cnn",
}

__all__ = [
    "build_teacher", "build_student", "load_teacher", "save_checkpoint", "load_state_dict_strict",
    "save_student", "load_student", "verify_checkpoint",
    "CheckpointMismatchError", "freeze", "fold_bn", "TapNet", "SpikingNet", "Spiking",
    "TEACHERS", "STUDENTS", "PAIRS",
]
