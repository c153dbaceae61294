"""SegmentationPredictor (paths, PIL, numpy; EXIF; checkpoints) and the colour overlays."""

import numpy as np
import pytest
import torch
from PIL import Image

from segmentation import build_segmenter, save_segmenter
from segmentation.data import VOCSegmentation
from deploy.seg_predictor import SegmentationPredictor
from segmentation.visualize import colorize, draw_segmentation, save_class_map, voc_palette

NAMES = ["__background__", "cat", "dog"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_segmenter("fcn", num_classes=3, output_stride=16, head_channels=16).eval()


def _picture(h=40, w=56):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    image[: h // 2] = (250, 20, 20)
    return image


def test_paths_pil_and_arrays_give_the_same_class_map(model, tmp_path, one_thread):
    picture = _picture()
    Image.fromarray(picture).save(tmp_path / "a.png")
    predictor = SegmentationPredictor(model, device="cpu", class_names=NAMES)
    from_array = predictor(picture)
    assert from_array.class_map.shape == (40, 56) and from_array.class_map.dtype == np.int64
    assert from_array.confidence.shape == (40, 56) and (from_array.confidence >= 1 / 3 - 1e-6).all()
    for other in (predictor(tmp_path / "a.png"), predictor(Image.open(tmp_path / "a.png")), predictor(str(tmp_path / "a.png"))):
        np.testing.assert_array_equal(other.class_map, from_array.class_map)
    batch = predictor([picture, picture[:20]])
    assert [r.image_size for r in batch] == [(40, 56), (20, 56)]
    summary = from_array.to_dict()
    assert summary["image_size"] == [40, 56] and sum(c["pixels"] for c in summary["classes"]) == 40 * 56
    assert set(from_array.pixel_counts()) <= set(NAMES)
    # The class map is the argmax of the model's own logits on the normalised image.
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    x = ((torch.from_numpy(picture).permute(2, 0, 1).float() / 255 - mean) / std)[None]
    with torch.no_grad():
        np.testing.assert_array_equal(model(x)["out"].argmax(1)[0].numpy(), from_array.class_map)


def test_exif_orientation_is_applied_to_paths_and_pil_images(model, tmp_path, one_thread):
    upright = _picture(40, 56)
    stored = np.rot90(upright, k=1)  # what a camera held sideways writes; tag 6 turns it back clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.ascontiguousarray(stored)).save(tmp_path / "phone.png", exif=exif)
    predictor = SegmentationPredictor(model, device="cpu")
    expected = predictor(upright).class_map
    for image in (tmp_path / "phone.png", Image.open(tmp_path / "phone.png")):
        result = predictor(image)
        assert result.image_size == (40, 56)
        np.testing.assert_array_equal(result.class_map, expected)


def test_checkpoint_resize_and_bad_input(model, tmp_path, one_thread):
    path = save_segmenter(model, tmp_path / "seg.pth", class_names=NAMES)
    predictor = SegmentationPredictor(path, device="cpu", resize=20)
    assert predictor.class_names == NAMES
    result = predictor(_picture(40, 56))
    assert result.class_map.shape == (40, 56)  # back at the image's size
    assert SegmentationPredictor(model, device="cpu").class_names == ["0", "1", "2"]
    with pytest.raises(ValueError, match="2 class names for a model with 3 classes"):
        SegmentationPredictor(model, device="cpu", class_names=["a", "b"])
    with pytest.raises(ValueError, match="resize must be a positive integer"):
        SegmentationPredictor(model, device="cpu", resize=0)
    with pytest.raises(FileNotFoundError, match="image not found"):
        predictor(tmp_path / "missing.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"no picture")
    with pytest.raises(ValueError, match="could not read .*bad.jpg as an image"):
        predictor(tmp_path / "bad.jpg")
    with pytest.raises(ValueError, match="H x W x 3 uint8"):
        predictor(np.zeros((4, 4), np.uint8))
    with pytest.raises(TypeError, match="expected an image path"):
        predictor(42)


def test_voc_palette_is_vocs():
    palette = voc_palette()
    assert palette.shape == (256, 3)
    assert [tuple(c) for c in palette[:4]] == [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0)]
    assert tuple(palette[15]) == (192, 128, 128) and tuple(palette[255]) == (224, 224, 192)


def test_overlay_tints_labelled_pixels_only():
    image = np.full((64, 64, 3), 100, np.uint8)
    labels = np.zeros((64, 64), np.int64)
    labels[40:, 40:] = 1
    labels[40:, :8] = 255
    out = draw_segmentation(image, labels, class_names=NAMES, alpha=0.5, legend=False)
    assert out.shape == (3, 64, 64) and out.dtype == torch.uint8
    assert out[:, 50, 50].tolist() == [114, 50, 50]  # halfway between (100, 100, 100) and VOC's (128, 0, 0)
    assert (out[:, :40, :40] == 100).all() and (out[:, 40:, :8] == 100).all()  # background and ignore untouched
    faint = draw_segmentation(image, labels, alpha=0.25, legend=False)  # alpha is the colour's share, not the picture's
    assert faint[:, 50, 50].tolist() == [107, 75, 75], "alpha=0.25: 0.75 x (100, 100, 100) + 0.25 x (128, 0, 0)"
    with_legend = draw_segmentation(image, labels, class_names=NAMES)
    assert not torch.equal(with_legend[:, :20, :40], out[:, :20, :40])  # the key is drawn top left
    assert torch.equal(draw_segmentation(torch.from_numpy(image).permute(2, 0, 1), labels, legend=False), out)
    assert colorize(labels)[50, 50].tolist() == [128, 0, 0]
    with pytest.raises(ValueError, match="differ in size"):
        draw_segmentation(image, labels[:10])
    with pytest.raises(ValueError, match=r"must lie in 0..255"):
        colorize(np.full((2, 2), 300))


def test_saved_class_maps_are_voc_masks(tmp_path):
    labels = np.zeros((10, 12), np.uint8)
    labels[2:6, 3:7] = 15
    labels[0] = 255
    root = tmp_path / "voc"
    save_class_map(root / "SegmentationClass" / "x.png", labels)
    png = Image.open(root / "SegmentationClass" / "x.png")
    assert png.mode == "P" and (np.asarray(png) == labels).all()
    (root / "JPEGImages").mkdir()
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(root / "JPEGImages" / "x.jpg")
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("x\n")
    _, mask = VOCSegmentation(root, "val").read_sample(0)
    np.testing.assert_array_equal(mask, labels)


class _Recording(torch.nn.Module):
    """A segmenter that records the size of every input it receives."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.sizes = model, []

    def forward(self, x: torch.Tensor) -> dict:
        self.sizes.append(tuple(x.shape[-2:]))
        return self.model(x)


def test_resize_scales_the_short_side_and_the_map_keeps_the_image_size(model, one_thread):
    recording = _Recording(model)
    predictor = SegmentationPredictor(recording, device="cpu", resize=20)
    for h, w, expected in ((40, 56, (20, 28)), (56, 40, (28, 20)), (10, 30, (20, 60))):
        result = predictor(_picture(h, w))
        assert recording.sizes[-1] == expected, f"an image of {h}x{w} with resize=20 reached the model at {recording.sizes[-1]}"
        assert result.class_map.shape == (h, w)
    SegmentationPredictor(recording, device="cpu")(_picture(40, 56))
    assert recording.sizes[-1] == (40, 56)  # no resize: the image as it is


def test_chinese_class_names_in_the_key_are_drawn_with_their_glyphs(monkeypatch):
    from engine import text

    image = np.full((120, 160, 3), 100, np.uint8)
    labels = np.zeros((120, 160), np.int64)
    labels[60:, 60:] = 1

    def key(name: str) -> torch.Tensor:
        return draw_segmentation(image, labels, class_names=["背景", name])[:, :30, :]

    text.reset_font_choice()
    try:
        road, car = key("道路"), key("汽车")
        # Without a font that has them, both names are the same empty boxes (.notdef): PIL's default font.
        assert not torch.equal(road, car)
        monkeypatch.setattr(text, "face_for", lambda _text: None)  # no TrueType font: PIL's load_default
        assert torch.equal(key("道路"), key("汽车"))
    finally:
        text.reset_font_choice()
