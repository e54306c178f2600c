"""Video: frame sampling, decoders, bad clips, the frame axis in the store, space + time
mixing, predict on video files, and a task only temporal mixing can solve."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from featcache import ExtractConfig, UserError, extract, load_backbone, open_store
from featcache.sources import FrameSampling, open_dataset
from featcache.sources.moving_clips import write_moving_clips, write_video
from featcache.sources.video import DECODERS, TooShort, read_clip
from featcache.taps import forward_taps
from sidetrain import FitConfig, ModelSpec, build_classifier, fit, load_predictor, predict, train_many

from .conftest import TINY, assert_predict_equals_cached

F = 4


@pytest.fixture(scope="session")
def clips(tmp_path_factory) -> Path:
    """3 train + 1 val clips per direction, 32 px, 8 frames each."""
    return write_moving_clips(tmp_path_factory.mktemp("video") / "moving", {"train": 3, "val": 1},
                              size=32, length=2 * F)


@pytest.fixture(scope="session")
def video_store(clips, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vstores") / "moving"
    extract(ExtractConfig(dataset=str(clips), out=out, dtype="fp32", frames=F, **TINY))
    return out


def test_frame_sampling():
    seg = FrameSampling(4, "segment")
    assert seg.indices(8, 25.0) == [1, 3, 5, 7]
    assert seg.indices(100, 10.0, start=2.0, end=4.0) == [22, 27, 32, 37]  # frames 20..39
    assert FrameSampling(3, "uniform").indices(9, 30.0) == [3, 4, 5]  # consecutive, centred
    assert FrameSampling(3, "uniform", fps=10).indices(30, 30.0) == [12, 15, 18]
    with pytest.raises(TooShort, match="too short: 3 frame\\(s\\)"):
        seg.indices(3, 25.0)
    with pytest.raises(TooShort, match="starts at 100 s, past the clip's end \\(4.0 s\\)"):
        seg.indices(100, 25.0, start=100.0, end=102.0)
    with pytest.raises(UserError, match="--fps needs --sampling uniform"):
        FrameSampling(4, "segment", fps=5)


def test_decord_and_pyav_decode_the_same_frames(clips):
    pytest.importorskip("decord")
    path = clips / "train" / "left" / "0000.mp4"
    pick = lambda n, fps: list(range(n))  # noqa: E731
    a, b = DECODERS["decord"](path, pick), DECODERS["av"](path, pick)
    assert a.shape == (2 * F, 32, 32, 3)
    np.testing.assert_array_equal(a, b)


def test_auto_reads_h264_with_decord_other_codecs_with_pyav_and_resumes_alike(
        clips, video_store, tmp_path, monkeypatch):
    """With B-frames decord picked other frames than asked for in MPEG-4 Part 2 and HEVC:
    `auto` leaves every codec but H.264, VP8 and VP9 to PyAV, and a store resumes only under
    the decoding it began with."""
    pytest.importorskip("decord")
    used = []
    for name, real in list(DECODERS.items()):
        monkeypatch.setitem(DECODERS, name, lambda p, pick, real=real, name=name: used.append(name) or real(p, pick))
    frames = np.stack([np.asarray(f) for f in read_clip(clips / "train" / "left" / "0000.mp4",
                                                         FrameSampling(2 * F, "uniform"))])
    assert used == ["decord"]  # (the clips are H.264)
    import av
    with av.open(str(tmp_path / "xvid.avi"), "w") as container:  # MPEG-4 Part 2, as Xvid writes
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())
    read_clip(tmp_path / "xvid.avi", FrameSampling(F))
    assert used == ["decord", "av"]
    assert open_store(video_store).meta["dataset"]["decoder"] == "auto"
    monkeypatch.setenv("FEATCACHE_VIDEO_DECODER", "av")
    with pytest.raises(UserError, match=r"video decoder: store read its clips with 'auto', this run 'av' "
                                        r"\(FEATCACHE_VIDEO_DECODER=auto continues it alike\)"):
        extract(ExtractConfig(dataset=str(clips), out=video_store, dtype="fp32", frames=F, **TINY))


@pytest.mark.parametrize("degrees", [90, -90, 180, 0])  # 0: an all-zero matrix
def test_a_clip_stored_sideways_is_read_upright_by_every_decoder(clips, tmp_path, degrees):
    """Phones store portrait clips sideways, with a display matrix that says how to turn
    them: PyAV turns them as players do, and decord (which turns some and fails on others,
    then PyAV decodes) gives the same. A degenerate (all-zero) matrix, which some broken
    writers leave, turns nothing, as in players."""
    import struct
    path = clips / "train" / "left" / "0000.mp4"
    plain = DECODERS["av"](path, lambda n, fps: list(range(n)))
    data = bytearray(path.read_bytes())
    box = data.find(b"tkhd") - 4  # the track header: its matrix (9 fixed-point numbers)
    at = box + (60 if data[box + 8] == 1 else 48)
    one = 0x10000
    cos, sin = {90: (0, one), -90: (0, -one), 180: (-one, 0), 0: (0, 0)}[degrees]
    data[at:at + 36] = struct.pack(">9i", cos, -sin, 0, sin, cos, 0, 0, 0, 0x40000000 if degrees else 0)
    (tmp_path / "turned.mp4").write_bytes(data)
    upright = np.rot90(plain, degrees // 90, axes=(1, 2))
    np.testing.assert_array_equal(DECODERS["av"](tmp_path / "turned.mp4", lambda n, fps: list(range(n))), upright)
    read = np.stack([np.asarray(f) for f in read_clip(tmp_path / "turned.mp4", FrameSampling(2 * F, "uniform"))])
    np.testing.assert_array_equal(read, upright)  # (decord where installed: H.264)


def test_pyav_counts_the_frames_of_containers_that_do_not_say(clips, tmp_path):
    """MKV and WebM report no frame count: PyAV then counts packets instead of decoding all."""
    import av
    frames = np.stack([np.asarray(f) for f in read_clip(clips / "train" / "up" / "0000.mp4",
                                                         FrameSampling(2 * F, "uniform"))])
    write_video(tmp_path / "clip.mkv", frames, fps=8)
    with av.open(str(tmp_path / "clip.mkv")) as c:
        assert c.streams.video[0].frames == 0
    got = DECODERS["av"](tmp_path / "clip.mkv", lambda n, fps: [n - 1] if n == 2 * F else [])
    assert got.shape == (1, 32, 32, 3)


def test_a_folder_mixing_images_and_videos_is_refused(clips, tmp_path):
    import shutil
    root = shutil.copytree(clips, tmp_path / "mixed")
    Image.new("RGB", (32, 32)).save(root / "train" / "up" / "cover.jpg")
    with pytest.raises(UserError, match=r"mixes 1 image\(s\) and 16 video\(s\) \(e.g. train/up/cover.jpg\)"):
        open_dataset(str(root))


def test_the_store_keeps_the_frame_axis_and_each_frame_is_the_backbone_on_that_frame(clips, video_store):
    store = open_store(video_store)
    lay = store.layout
    assert (lay.frames, lay.frame_prefix, lay.prefix_tokens, lay.patches, lay.tokens) == (F, 1, F, 4, F + F * 4)
    assert store.meta["transform"]["video"]["frames"] == F
    val = store.split("val")
    assert val.tokens.shape == (4, 12, F + 4 * F, 192)
    # recompute clip 0 frame by frame with timm, independently of the extractor
    bb = load_backbone("vit_tiny", random_init=True, img_size=32)
    import timm.data
    t = timm.data.create_transform(**bb.data_config, is_training=False)
    frames = read_clip(clips / val.keys[0], FrameSampling(F))
    per_frame = forward_taps(bb.model, torch.stack([t(f) for f in frames]), list(range(12)))  # (F, L, 5, D)
    got = torch.from_numpy(val.tokens[0])
    for f in range(F):
        torch.testing.assert_close(got[:, f], per_frame[f, :, 0], atol=1e-5, rtol=0)  # class tokens
        torch.testing.assert_close(got[:, F + 4 * f:F + 4 * (f + 1)], per_frame[f, :, 1:], atol=1e-5, rtol=0)


def test_bad_empty_and_short_videos_are_skipped_and_recorded(tmp_path, capfd):
    root = write_moving_clips(tmp_path / "v", {"train": 2}, size=32, length=2 * F)
    (root / "train" / "up" / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(500))
    (root / "train" / "up" / "empty.mp4").write_bytes(b"")
    write_video(root / "train" / "down" / "short.mp4", np.zeros((F - 1, 32, 32, 3), np.uint8), fps=8)
    import av
    with av.open(str(root / "train" / "up" / "audio.mp4"), "w") as container:  # sound alone
        stream = container.add_stream("aac", rate=8000)
        stream.layout = "mono"
        silence = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        silence.sample_rate = 8000
        for packet in [*stream.encode(silence), *stream.encode()]:
            container.mux(packet)
    r = extract(ExtractConfig(dataset=str(root), out=tmp_path / "s", frames=F, **TINY))
    skipped = {k: why for s in r.skipped.values() for k, why in s.items()}
    assert sorted(skipped) == ["train/down/short.mp4", "train/up/audio.mp4", "train/up/corrupt.mp4",
                               "train/up/empty.mp4"]
    assert "too short: 3 frame(s)" in skipped["train/down/short.mp4"]
    assert skipped["train/up/audio.mp4"] == "ValueError: the file holds no video stream (audio only?)"
    assert "ERROR opening" not in capfd.readouterr().err  # decord's own line: the note says why
    store = open_store(r.path)
    labels = np.concatenate([store.split(s).labels[:] for s in store.splits])
    assert (labels == -1).sum() == 4 and (labels >= 0).sum() == 8


def test_a_manifest_with_start_and_end_cuts_clips(tmp_path):
    frames = np.zeros((20, 32, 32, 3), np.uint8)
    frames[:, :, :, 0] = (np.arange(20) * 12)[:, None, None]  # red = 12 x frame number
    write_video(tmp_path / "ramp.mp4", frames, fps=10)
    (tmp_path / "m.csv").write_text("path,label,start,end,split\nramp.mp4,a,0,1,train\n"
                                    "ramp.mp4,b,1,2,train\nramp.mp4,a,,,val\n")
    ds = open_dataset(str(tmp_path / "m.csv"), video=FrameSampling(2))
    train = ds.splits["train"]
    assert train.keys == ["ramp.mp4#t=0,1", "ramp.mp4#t=1,2"] and ds.video.frames == 2
    red = [[np.asarray(f)[..., 0].mean() for f in train.open(i)] for i in range(2)]
    np.testing.assert_allclose(red, [[2 * 12, 7 * 12], [12 * 12, 17 * 12]], atol=4)  # frames 2,7 | 12,17
    (tmp_path / "m.csv").write_text("path,label,start,end\nramp.mp4,a,0,1\nramp.mp4,b,0.5,0.2\n")
    with pytest.raises(UserError, match="row 3: the clip runs from start 0.5 s to end 0.2 s"):
        open_dataset(str(tmp_path / "m.csv"), video=FrameSampling(2))  # at once, not as a skipped clip
    (tmp_path / "m.csv").write_text("path,label,start,end\nramp.mp4,a,nan,1\n")
    with pytest.raises(UserError, match="row 2: start/end must be seconds, not 'nan'"):
        open_dataset(str(tmp_path / "m.csv"), video=FrameSampling(2))


def test_temporal_mixing_sees_frame_order_and_spatial_mixing_does_not(video_store):
    """Reversing the frames leaves the frame-averaged probe and space-only LoSA unchanged;
    LoSA with temporal mixing (non-zero init, so it is active) tells them apart."""
    store = open_store(video_store)
    z = torch.from_numpy(store.split("train").tokens[:6])
    lay = store.layout
    idx = torch.cat([torch.arange(F).flip(0),
                     (F + torch.arange(F * lay.patches).view(F, lay.patches).flip(0).flatten())])
    reversed_z = z[:, :, idx]
    for spec, moves in ((ModelSpec("linear"), False),
                        (ModelSpec("losa", rank=4, temporal=False, zero_init=False), False),
                        (ModelSpec("losa", rank=4, temporal=False, zero_init=False, prefix_mixing="channel"), False),
                        (ModelSpec("losa", rank=4, temporal=True, zero_init=False), True)):
        model = build_classifier(spec, store, seed=0).eval()
        with torch.no_grad():
            same = torch.allclose(model(z), model(reversed_z), atol=1e-5)
        assert same != moves, spec
    # zero init: LoSA with temporal mixing starts exactly at the frame-averaged probe
    losa = build_classifier(ModelSpec("losa", rank=4), store, seed=3)
    assert losa.side.variant == "A"  # auto: A for video, B for images (docs/losa.md)
    probe = build_classifier(ModelSpec("linear"), store, seed=3)
    torch.testing.assert_close(losa(z), probe(z), rtol=0, atol=0)


def test_predict_on_video_files_equals_the_cached_path(clips, video_store, tmp_path):
    r = fit(FitConfig(cache=video_store, rank=4, epochs=2, batch_size=4, out=tmp_path / "run"))
    assert_predict_equals_cached(r.run, video_store, [clips / k for k in open_store(video_store).split("val").keys])
    Image.new("RGB", (32, 32)).save(tmp_path / "frame.png")
    missing, image = predict(r.run, [tmp_path / "missing.mp4", tmp_path / "frame.png"])
    assert "as a video clip (the run was trained on clips of" in missing["error"]
    assert "frame.png is an image, and the run was trained on clips of 4 frames" in image["error"]
    import av  # frames in memory: picked and transformed as the store's were

    path = clips / open_store(video_store).split("val").keys[0]
    with av.open(str(path)) as video:
        frames = [np.asarray(f.to_image()) for f in video.decode(video=0)]  # arrays, as a user has
    predictor = load_predictor(r.run)
    torch.testing.assert_close(predictor.clip(frames), predictor.read(path))
    with pytest.raises(UserError, match=rf"clips of {F} frames \(B, {F}, 3, 32, 32\), not torch.Size"):
        predictor(predictor.clip(frames)[None, :2])
    uniform = replace(predictor, sampling=FrameSampling(F, "uniform", fps=4))  # its step needs the rate
    with pytest.raises(UserError, match=r"sampled frames at 4 per second: give the video's frame rate"):
        uniform.clip(frames)
    assert uniform.clip(frames, fps=4).shape[0] == F
    one = extract(ExtractConfig(dataset=str(clips), out=tmp_path / "one", dtype="fp32", frames=1, **TINY)).path
    r = fit(FitConfig(cache=one, method="linear", epochs=1, batch_size=4, out=tmp_path / "run1"))
    assert_predict_equals_cached(r.run, one, [clips / k for k in open_store(one).split("val").keys])  # clips of 1


def test_views_are_refused_for_video(clips, tmp_path):
    with pytest.raises(UserError, match="--views is for images"):
        extract(ExtractConfig(dataset=str(clips), out=tmp_path / "s", frames=F, views=2, **TINY))


def test_only_temporal_mixing_tells_which_way_things_move(tmp_path):
    """The direction of motion is invisible in any frame and in the frames' average: the
    frame-averaged probe and LoSA without temporal mixing stay near chance (25 %), LoSA with
    temporal mixing does not. (Random-init ViT-Ti, 64 px, 8 frames; about a minute.)"""
    data = write_moving_clips(tmp_path / "moving", {"train": 64, "val": 12, "test": 20}, size=64, length=16)
    store = extract(ExtractConfig(dataset=str(data), out=tmp_path / "s", frames=8, taps="every:2",
                                  **{**TINY, "img_size": 64, "batch_size": 16})).path
    common = dict(cache=store, epochs=16, batch_size=16, variant="A")
    probe, space, time = train_many([
        FitConfig(method="linear", lr=1e-2, out=tmp_path / "probe", **common),
        FitConfig(method="losa", lr=3e-3, temporal=False, out=tmp_path / "space", **common),
        FitConfig(method="losa", lr=3e-3, temporal=True, out=tmp_path / "time", **common)])
    assert probe.test_acc < 0.45 and space.test_acc < 0.45
    assert time.test_acc > max(probe.test_acc, space.test_acc) + 0.3


def test_ls_tells_video_stores_by_their_frames_and_sampling(video_store, run_cli):
    (line,) = run_cli("featcache", "ls", str(video_store.parent)).stdout.splitlines()
    assert f"32 px x {F} frames (segment)  moving (4 classes)" in line
