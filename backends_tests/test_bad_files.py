"""Bad files: images that cannot be decoded are replaced in training (counted, named), other
image modes and float arrays read correctly or are refused by name, and every weights file that
cannot be read (and the convert command) gives one clear error naming the file and the format."""

import importlib.util
import io
import pathlib
import re
import struct
import warnings
import zipfile
import zlib

import keras
import numpy as np
import pytest
from PIL import Image
from pipeline_probe import IdentityViews

from ibot_keras import BlockMasking, checkpoint, state_files
from ibot_keras.convert import main as convert_main
from ibot_keras.data import ArraySource, ImageFolderSource, IterableSource, Pipeline
from ibot_keras.data.augment import to_pil
from ibot_keras.data.sources import UnreadableImageError, read_image
from ibot_keras.state_files import WeightsFileError

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_SAFETENSORS = importlib.util.find_spec("safetensors") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
needs_safetensors = pytest.mark.skipif(not HAS_SAFETENSORS, reason="safetensors not installed")


def png_bytes(width, height, bit_depth, color_type, rows):
    """A PNG written by hand (``rows``: the unfiltered scanlines), so that its header may claim
    any size and its samples any bit depth."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    data = zlib.compress(b"".join(b"\x00" + row for row in rows))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def truncated_jpeg():
    """A valid JPEG of noise cut in half: it passes Pillow's ``verify``, only decoding fails."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


def flat_png(root, name, value, size=6):
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(root / name)


# -- images met during training -------------------------------------------------------------------
def test_truncated_and_bomb_images_met_in_training_are_replaced_counted_and_named(tmp_path, monkeypatch):
    for i in (0, 1, 3, 5):
        flat_png(tmp_path, f"{i:03d}.png", i)
    (tmp_path / "002.jpg").write_bytes(truncated_jpeg())
    flat_png(tmp_path, "004.png", 4, size=90)  # 8,100 pixels: a bomb once the limit is 5,000
    source = ImageFolderSource(str(tmp_path))
    assert len(source) == 6  # both pass the up-front check
    # Between the limit and twice it Pillow only warns, and would decode: we refuse.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    pipeline = Pipeline(source, IdentityViews(), BlockMasking([0.0, 0.3], [0.0, 0.2]), 2, 6, 2, shuffle=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = [pipeline.batch(step)["global_crops"][:, 0, 0, 0, 0].tolist() for step in (0, 1)]
    assert first == [[0, 1, 3, 3, 5, 5]] * 2  # each bad image replaced by the next readable one
    messages = [str(w.message) for w in caught if "Could not read" in str(w.message)]
    assert len(messages) == 2, messages  # one warning per file, however often it is met
    assert re.search(r"002\.jpg \(OSError: image file is truncated.*replaced by .*003\.png", messages[0])
    assert re.search(r"004\.png \(90x90 = 8100 pixels exceed .*decompression bomb.*replaced by .*005\.png", messages[1])
    assert pipeline.replaced_images == {str(tmp_path / "002.jpg"): 2, str(tmp_path / "004.png"): 2}
    with pytest.raises(UnreadableImageError, match=r"002\.jpg.*image file is truncated"):
        source[2]  # read directly, the error names the file


def test_a_bomb_is_skipped_by_the_folder_check_not_fatal(tmp_path):
    flat_png(tmp_path, "a.png", 1)
    # A 20,000 x 20,000 header (over twice MAX_IMAGE_PIXELS): Pillow's open raises, no decode.
    (tmp_path / "bomb.png").write_bytes(png_bytes(20000, 20000, 1, 0, []))
    with pytest.warns(UserWarning, match=r"Skipped 1 unreadable.*bomb\.png.*DecompressionBombError"):
        source = ImageFolderSource(str(tmp_path))
    assert [pathlib.Path(p).name for p in source.paths] == ["a.png"]
    with pytest.raises(UnreadableImageError, match=r"bomb\.png.*DecompressionBomb"):
        read_image(tmp_path / "bomb.png")


# -- image modes ----------------------------------------------------------------------------------
SIXTEEN_BIT = np.array([[0, 255, 256, 32767], [32768, 65279, 65280, 65535]], np.uint16)


def test_16_bit_grey_png_keeps_the_high_byte_as_16_bit_rgb_does(tmp_path):
    Image.fromarray(SIXTEEN_BIT).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as image:
        assert image.mode == "I;16"
    grey = np.asarray(read_image(tmp_path / "grey16.png"))
    expected = np.repeat((SIXTEEN_BIT // 256).astype(np.uint8)[..., None], 3, axis=-1)  # value >> 8
    np.testing.assert_array_equal(grey, expected)
    # Pillow itself reads a 16-bit RGB PNG by the high byte: the grey one must agree with it.
    rgb16 = np.repeat(SIXTEEN_BIT[..., None], 3, axis=-1).astype(">u2")
    (tmp_path / "rgb16.png").write_bytes(png_bytes(4, 2, 16, 2, [row.tobytes() for row in rgb16]))
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "rgb16.png")), grey)
    # mode I (32-bit integers, e.g. a TIFF) is read as 16-bit data too
    Image.fromarray(SIXTEEN_BIT.astype(np.int32), "I").save(tmp_path / "grey32.tif")
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "grey32.tif")), grey)
    Image.fromarray(np.full((2, 2), 70000, np.int32), "I").save(tmp_path / "wide.tif")
    with pytest.raises(UnreadableImageError, match=r"wide\.tif.*0\.\.65535"):
        read_image(tmp_path / "wide.tif")
    # A 16-bit PIL image handed to the augmentation by a custom source reads the same way.
    np.testing.assert_array_equal(np.asarray(to_pil(Image.fromarray(SIXTEEN_BIT))), grey)


def test_float_la_palette_and_cmyk_images_read_as_rgb_uint8(tmp_path):
    unit = np.array([[0.0, 0.25], [0.5, 1.0]], np.float32)
    Image.fromarray(unit, "F").save(tmp_path / "unit.tif")
    Image.fromarray(unit * 200, "F").save(tmp_path / "bytes.tif")
    Image.new("LA", (2, 2), (100, 50)).save(tmp_path / "la.png")
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 255, 0, 0])
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "p.png", transparency=0)
    Image.new("CMYK", (2, 2), (0, 255, 255, 0)).save(tmp_path / "cmyk.tif")
    expected = {
        "unit.tif": np.round(unit * 255),  # [0, 1] floats scaled by 255
        "bytes.tif": np.round(unit * 200),  # [0, 255] floats kept
        "la.png": np.full((2, 2), 100),
    }
    for name, grey in expected.items():
        image = read_image(tmp_path / name)
        assert image.mode == "RGB", name
        np.testing.assert_array_equal(np.asarray(image), np.repeat(grey[..., None], 3, -1).astype(np.uint8), name)
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "p.png")), [[[0, 0, 0], [255, 0, 0]]])
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "cmyk.tif"))[0, 0], [255, 0, 0])
    Image.fromarray(np.full((2, 2), np.nan, np.float32), "F").save(tmp_path / "nan.tif")
    with pytest.raises(UnreadableImageError, match=r"nan\.tif.*finite"):
        read_image(tmp_path / "nan.tif")


# -- in-memory float images -----------------------------------------------------------------------
LEVELS = np.random.default_rng(0).integers(0, 256, (3, 4, 4, 3))
FLOATS = (LEVELS / 255).astype(np.float32)  # [0, 1] images of known 8-bit levels


def test_float_images_map_from_their_range_or_are_refused_by_name():
    np.testing.assert_array_equal(np.stack(list(IterableSource(FLOATS, verbose=0).images)), LEVELS)
    np.testing.assert_array_equal(ArraySource(FLOATS).images, LEVELS)
    np.testing.assert_array_equal(ArraySource(FLOATS * 255).images, LEVELS)  # [0, 255] floats
    with pytest.raises(ValueError, match=r"element 1 has values in \[-.*Undo the normalisation"):
        IterableSource([FLOATS[0], FLOATS[1] * 2 - 1], verbose=0)
    with pytest.raises(ValueError, match="the image array has values in .* Undo the normalisation"):
        ArraySource(FLOATS * 2 - 1)
    broken = FLOATS.copy()
    broken[2, 1, 1, 0] = np.nan
    with pytest.raises(ValueError, match="image 2 of element 1 has NaN or infinite"):
        IterableSource([FLOATS[0], broken], verbose=0)
    with pytest.raises(ValueError, match="image 2 of the image array has NaN or infinite"):
        ArraySource(np.where(np.isnan(broken), np.inf, broken))
    with pytest.raises(ValueError, match="element 0 has values up to 300"):
        IterableSource([np.full((4, 4), 300.0)], verbose=0)


def test_array_source_refuses_one_image_and_bad_shapes():
    with pytest.raises(ValueError, match=r"got one \(H, W, 3\) image.*pass images\[None\] or a \(N, H, W, 3\) array"):
        ArraySource(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"got one \(H, W, 4\) image"):
        ArraySource(np.zeros((8, 8, 4), np.uint8))
    with pytest.raises(ValueError, match=r"C 1, 3 or 4; got shape \(2, 8, 8, 5\)"):
        ArraySource(np.zeros((2, 8, 8, 5), np.uint8))
    with pytest.raises(ValueError, match=r"image 1 has shape \(8,\)"):
        ArraySource([np.zeros((8, 8), np.uint8), np.zeros(8, np.uint8)])
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        ArraySource(np.zeros((3, 8, 8), np.uint8), labels=[0, 1])
    assert len(ArraySource(np.zeros((8, 8, 3), np.uint8)[None])) == 1 and len(ArraySource(np.zeros((5, 8, 8)))) == 5


# -- weights files --------------------------------------------------------------------------------
def good_file(tmp_path, suffix):
    return state_files.write_state({"w": np.arange(64, dtype="float32")}, tmp_path / f"good{suffix}").read_bytes()


WEIGHTS_FORMATS = [".npz", pytest.param(".safetensors", marks=needs_safetensors),
                   pytest.param(".pth", marks=needs_torch)]
NOT_THIS_FORMAT = {".npz": "not a zip archive", ".safetensors": "not a safetensors file",
                   ".pth": "not a zip archive or a pickle"}
FORMAT_NAMES = {".npz": r"NumPy archive \(\.npz\)", ".safetensors": r"safetensors file \(\.safetensors\)",
                ".pth": r"PyTorch checkpoint \(\.pth\)"}


@pytest.mark.parametrize("suffix", WEIGHTS_FORMATS)
@pytest.mark.parametrize("case", ["empty", "text", "truncated", "lfs"])
def test_unreadable_weights_files_name_the_file_and_the_format(tmp_path, suffix, case):
    content = {
        "empty": b"",
        "text": b"<html>Not Found</html>\n",
        "truncated": good_file(tmp_path, suffix)[:-40],
        "lfs": b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n",
    }[case]
    problem = {"empty": "empty file", "text": NOT_THIS_FORMAT[suffix], "truncated": "truncated",
               "lfs": "Git LFS pointer"}[case]
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(content)
    pattern = rf"bad\{suffix}' as an? {FORMAT_NAMES[suffix]}: .*{problem}"
    with pytest.raises(WeightsFileError, match=pattern) as caught:
        state_files.read_state(path)
    assert isinstance(caught.value, ValueError) and caught.value.path == str(path) and caught.value.format == suffix
    with pytest.raises(WeightsFileError, match=pattern):  # what the loaders read, too
        checkpoint.backbone_from_official(path)


def test_npz_special_cases_and_content_errors_name_the_file(tmp_path):
    np.savez(tmp_path / "objects.npz", a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(WeightsFileError, match=r"objects\.npz.*Python objects"):
        state_files.read_state(tmp_path / "objects.npz")
    with open(tmp_path / "single.npz", "wb") as handle:
        np.save(handle, np.zeros(3))
    with pytest.raises(WeightsFileError, match=r"single\.npz.*one \.npy array"):
        state_files.read_state(tmp_path / "single.npz")
    (tmp_path / "folder.npz").mkdir()
    with pytest.raises(WeightsFileError, match=r"folder\.npz.*directory"):
        state_files.read_state(tmp_path / "folder.npz")
    with pytest.raises(FileNotFoundError, match=r"absent\.npz"):
        checkpoint.backbone_from_official(tmp_path / "absent.npz")
    state_files.write_state({"x": np.zeros(2)}, tmp_path / "other.npz")
    with pytest.raises(ValueError, match=r"other\.npz': Not a ViT state dict"):
        checkpoint.backbone_from_official(tmp_path / "other.npz")


@needs_torch
def test_pth_refused_by_weights_only_is_named(tmp_path):
    import torch

    torch.save({"f": io.BytesIO}, tmp_path / "code.pth")
    with pytest.raises(WeightsFileError, match=r"code\.pth.*weights_only=True\) refused it.*BytesIO"):
        state_files.read_state(tmp_path / "code.pth")


# -- the convert command --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def convert_dir(tmp_path_factory):
    """Bad inputs of the convert command: a .keras cut in half, text, a zip that is no Keras
    model, a model that is no ViT, a state dict that is no ViT, an empty .npz."""
    tmp_path = tmp_path_factory.mktemp("convert")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.save(tmp_path / "sequential.keras")
    data = (tmp_path / "sequential.keras").read_bytes()
    (tmp_path / "cut.keras").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.keras").write_bytes(b"hello")
    with zipfile.ZipFile(tmp_path / "junk.keras", "w") as archive:
        archive.writestr("config.json", "{not json")
    state_files.write_state({"x": np.zeros(2)}, tmp_path / "other.npz")
    (tmp_path / "empty.npz").write_bytes(b"")
    return tmp_path


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["absent.npz", "out.npz"], r"absent\.npz' does not exist"),
        (["other.npz", "out.bin"], r"Unknown checkpoint format for '.*out\.bin'"),
        (["empty.npz", "out.keras"], r"empty\.npz' as a NumPy archive \(\.npz\): empty file"),
        (["other.npz", "out.keras"], r"other\.npz': Not a ViT state dict"),
        (["cut.keras", "out.npz"], r"cut\.keras' as a Keras model file \(\.keras\): truncated"),
        (["text.keras", "out.npz"], r"text\.keras' as a Keras model file \(\.keras\): not a zip archive"),
        (["junk.keras", "out.npz"], r"junk\.keras' as a Keras model file \(\.keras\): Keras could not load it"),
        (["sequential.keras", "out.npz"], r"holds a Sequential; convert reads a VisionTransformer"),
        (["other.npz", "out.keras", "--part", "bogus"], r"argument --part: invalid choice"),
        (["other.npz", "out.keras", "--num_heads", "0"], r"--num_heads must be a positive integer"),
        (["other.npz", "out.npz", "--keras_hub"], r"--keras_hub writes a \.keras file"),
        (["other.npz"], r"the following arguments are required: dst"),
    ],
)
def test_convert_fails_with_one_line_and_code_2(convert_dir, monkeypatch, capsys, argv, fragment):
    monkeypatch.chdir(convert_dir)
    capsys.readouterr()
    with pytest.raises(SystemExit) as caught:
        convert_main(argv)
    assert caught.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("convert: error: "), lines
    assert re.search(fragment, lines[0]), lines[0]
