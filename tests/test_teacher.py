"""teacher.py: the plan each flag resolves, the checks that two models can exchange attention, normalisation."""
import pytest
import torch

import data
import vit
from teacher import Teacher, parse_layers

from conftest import ARCH  # teacher_file (conftest.py) writes a teacher of this shape


def student(**kw):
    torch.manual_seed(1)
    return vit.VisionTransformer(**{**ARCH, **kw})


def test_plan_from_flags(teacher_file):
    t = Teacher(teacher_file, student(), ":-1", 3, "q")
    assert t.layers == [0, 1] and t.heads == 3
    assert "layers 0-1 of 3, heads 3/4, runs 1 of its blocks, then block 1's q, k, v" in t.summary()
    qkv = t(torch.randn(1, 3, 16, 16))
    q, k, v = qkv[0]  # exchange "q": the teacher hands over q only
    assert sorted(qkv) == [0, 1] and q.shape == (1, 3, 17, 8) and q.is_contiguous() and k is None and v is None
    assert parse_layers("-2:", 5, 7) == [3, 4]
    assert parse_layers("0,4", 5, 5) == [0, 4]
    assert parse_layers(":", 3, 6) == [0, 1, 2]


def test_shared_drop_path_masks(teacher_file):
    s = student(drop_path=0.5).train()
    masks = Teacher(teacher_file, s).drop_masks(s, torch.zeros(4, 3, 16, 16))
    assert masks.shape == (3, 2, 4)
    assert Teacher(teacher_file, s, share_drop_path=False).drop_masks(s, torch.zeros(4, 3, 16, 16)) is None
    assert Teacher(teacher_file, s).drop_masks(s.eval(), torch.zeros(4, 3, 16, 16)) is None


def test_teacher_renormalises_with_its_own_statistics(teacher_file):
    s = student()
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    t = Teacher(teacher_file, s, mean=mean, std=std)
    pixels = torch.rand(2, 3, 16, 16)
    as_student = (pixels - torch.tensor(data.MEAN).view(3, 1, 1)) / torch.tensor(data.STD).view(3, 1, 1)
    as_teacher = (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    q = t(as_student)[0][0]
    q_ref = t.model.forward_features(as_teacher, collect=[0], depth=1)[1][0][0]
    assert torch.allclose(q, q_ref, atol=1e-5)
    assert not torch.allclose(q, Teacher(teacher_file, s)(as_student)[0][0], atol=1e-3)  # the flag changes what runs


@pytest.mark.parametrize("kw,match", [
    (dict(layers="0,7"), "layer 7 is out of range: the student has 3 layers and the teacher 3"),
    (dict(layers="5:"), "selects none"),
    (dict(layers="x"), "neither a slice"),
    (dict(heads=5), "heads 5 is out of range"),
])
def test_bad_plans(teacher_file, kw, match):
    with pytest.raises(ValueError, match=match):
        Teacher(teacher_file, student(), **kw)


def test_layers_beyond_a_shallower_teacher(teacher_file):
    with pytest.raises(ValueError, match="the student has 5 layers and the teacher 3"):
        Teacher(teacher_file, student(depth=5), "4")
    assert Teacher(teacher_file, student(depth=5), ":").layers == [0, 1, 2]  # a deeper student takes what there is


@pytest.mark.parametrize("kw,exchange,match", [(dict(num_heads=2), "qk", "heads per layer"),
                                               (dict(patch_size=8), "qk", "tokens"),
                                               (dict(embed_dim=64), "q", "head widths"),
                                               (dict(embed_dim=64), "v", "head widths")])
def test_models_that_cannot_exchange(teacher_file, kw, exchange, match):
    with pytest.raises(ValueError, match=match):
        Teacher(teacher_file, student(**kw), exchange=exchange)


def test_a_wider_teacher_can_hand_over_whole_maps(teacher_file):
    t = Teacher(teacher_file, student(embed_dim=64), exchange="qk")
    assert t.heads == 4
