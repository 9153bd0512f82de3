"""Training data pipelines (lcm_jax.data) and the latent cache (lcm_jax.cache_latents).

Every data set is built here with PIL: tar shards in img2dataset's layout, a Hugging Face
image folder, TFDS mock data, and a latent cache of the tiny SD 1.x pipeline. Each has
deliberately bad records (corrupt or truncated images, a missing caption, a missing image).
Expected pixels come from PIL directly, with torchvision's resize/crop rules written out.
"""

from __future__ import annotations

import functools
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from lcm_jax.data import default_data_config, make_train_data, sources
from lcm_jax.data import latents as latents_lib
from lcm_jax.errors import LcmJaxError

R = 16  # training resolution in these tests
from tests.helpers import REPO  # noqa: E402

# Sizes (w, h): landscape, portrait, square, odd, smaller than R (upsampled), already R wide.
SIZES = [(40, 24), (24, 40), (20, 20), (33, 21), (12, 9), (16, 30), (50, 17)]
FORMATS = ["PNG", "JPEG", "WEBP"]
EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}


def make_image(i: int) -> tuple[bytes, str]:
  """A distinct image (noise over a gradient, so every crop differs) and its extension."""
  w, h = SIZES[i % len(SIZES)]
  rng = np.random.default_rng(i)
  grad = np.linspace(0, 200, w)[None, :, None] + np.linspace(0, 50, h)[:, None, None]
  pixels = np.clip(grad + rng.integers(0, 55, (h, w, 3)), 0, 255).astype(np.uint8)
  image = Image.fromarray(pixels)
  if i % 11 == 3:
    image = image.convert("L")  # grayscale files must come out RGB
  if i % 11 == 7:
    image = image.convert("RGBA")
  fmt = "PNG" if image.mode == "RGBA" else FORMATS[i % 3]
  buf = io.BytesIO()
  image.save(buf, fmt)
  return buf.getvalue(), EXTENSIONS[fmt]


def caption_of(i: int) -> str:
  if i == 0:  # longer than the tokenizer's 16 tokens: truncation
    return "a photo of a big red circle on the left and a small blue square in the corner of the sky"
  return f"photo {i}"


def expected_pixels(image, resolution: int = R, top_left=None, flip=False) -> np.ndarray:
  """PIL's view of the crop: RGB, shorter side -> R bilinear (longer side truncated, as
  torchvision computes it), crop at top_left (default: centred as torchvision rounds)."""
  im = Image.open(io.BytesIO(image)) if isinstance(image, bytes) else Image.fromarray(image)
  im = im.convert("RGB")
  w, h = im.size
  size = (resolution, int(resolution * h / w)) if w <= h else (int(resolution * w / h), resolution)
  if size != (w, h):
    im = im.resize(size, resample=Image.Resampling.BILINEAR)
  if top_left is None:
    top_left = (int(round((size[1] - resolution) / 2.0)), int(round((size[0] - resolution) / 2.0)))
  top, left = top_left
  im = im.crop((left, top, left + resolution, top + resolution))
  if flip:
    im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return np.asarray(im, np.float32) / 127.5 - 1.0


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


# Bad records of the tar data set: (shard, index in shard) -> kind.
WDS_BAD = {(0, 2): "corrupt", (1, 5): "truncated", (2, 1): "no caption", (3, 4): "no image"}
WDS_SHARDS, WDS_PER_SHARD = 4, 8


def write_wds(folder: str) -> dict:
  """4 tar shards x 8 samples as img2dataset writes them (key.jpg/.png/.webp, key.txt,
  key.json). Returns {key: (image bytes, caption)} for the 28 good samples."""
  os.makedirs(folder, exist_ok=True)
  good = {}
  for s in range(WDS_SHARDS):
    with tarfile.open(os.path.join(folder, f"{s:05d}.tar"), "w") as tar:
      for j in range(WDS_PER_SHARD):
        i = s * WDS_PER_SHARD + j
        key = f"{s:05d}{j:04d}"
        image, ext = make_image(i)
        bad = WDS_BAD.get((s, j))
        if bad == "corrupt":
          image = b"this is not an image"
        elif bad == "truncated":
          image = image[:len(image) // 2]
        if bad != "no image":
          add_member(tar, f"{key}.{ext}", image)
        if bad != "no caption":
          add_member(tar, f"{key}.txt", caption_of(i).encode())
        add_member(tar, f"{key}.json", json.dumps({"key": key}).encode())
        if bad is None:
          good[key] = (image, caption_of(i))
  return good


def write_imagefolder(folder: str) -> dict:
  """An ImageFolder: 12 images in the root and sub/, each folder with its metadata.jsonl.
  Bad: a corrupt image, an image without a metadata line, a row without "text", a row naming
  a missing file, a line that is not JSON (5 bad, 9 good). Returns {relative path: (bytes, caption)}."""
  os.makedirs(os.path.join(folder, "sub"), exist_ok=True)
  rows = {"": [], "sub": []}
  good = {}
  for i in range(12):
    sub = "sub" if i >= 8 else ""
    image, ext = make_image(100 + i)
    name = f"img{i:02d}.{ext}"
    if i == 4:
      image = b"\x89PNG\r\n\x1a\n broken"
    with open(os.path.join(folder, sub, name), "wb") as f:
      f.write(image)
    if i == 6:
      continue  # no metadata line
    row = {"file_name": name, "text": caption_of(100 + i)}
    if i == 9:
      del row["text"]
    rows[sub].append(json.dumps(row))
    if i not in (4, 9):
      good[os.path.join(sub, name)] = (image, caption_of(100 + i))
  rows[""].append(json.dumps({"file_name": "missing.png", "text": "photo missing"}))
  rows["sub"].append("{not json")
  for sub, lines in rows.items():
    with open(os.path.join(folder, sub, "metadata.jsonl"), "w") as f:
      f.write("\n".join(lines) + "\n")
  return good


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  from lcm_jax.tokenizer import load_tokenizer
  from tests.helpers import tiny_clip
  folder = str(tmp_path_factory.mktemp("tokenizer"))
  tiny_clip.write_tiny_tokenizer(folder)
  return load_tokenizer(folder)


@pytest.fixture(scope="module")
def wds(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("wds"))
  return folder, write_wds(folder)


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("imagefolder"))
  return folder, write_imagefolder(folder)


def ids_of(tokenizer, captions) -> np.ndarray:
  """Token ids as diffusers' pipelines make them."""
  return np.asarray(tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                              truncation=True, return_tensors="np").input_ids)


def key_lookup(tokenizer, good: dict) -> dict:
  """token ids row -> sample key (every caption is distinct)."""
  keys = list(good)
  ids = ids_of(tokenizer, [good[k][1] for k in keys])
  lookup = {tuple(row): k for row, k in zip(ids, keys)}
  assert len(lookup) == len(keys)
  return lookup


def data(path, tokenizer, *, seed=0, batch=4, process_index=0, process_count=1, **overrides):
  config = default_data_config()
  config.update(path=path, **overrides)
  return make_train_data(config, resolution=R, global_batch_size=batch, seed=seed, tokenizer=tokenizer,
                         process_index=process_index, process_count=process_count)


def take(train_data, n: int) -> list[dict]:
  return [next(train_data) for _ in range(n)]


def keys_in(batches, lookup) -> list[str]:
  return [lookup[tuple(row)] for b in batches for row in b["input_ids"]]


def assert_batches_equal(a: list[dict], b: list[dict]) -> None:
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ----------------------------------------------------------------------------- paths


def test_expand_braces():
  assert sources.expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
  assert sources.expand_braces("{a,b}/x-{8..10}.tar") == ["a/x-8.tar", "a/x-9.tar", "a/x-10.tar",
                                                          "b/x-8.tar", "b/x-9.tar", "b/x-10.tar"]
  assert sources.expand_braces("plain.tar") == ["plain.tar"]
  assert sources.expand_braces("gs://b/{0..1}.tar") == ["gs://b/0.tar", "gs://b/1.tar"]


def test_path_forms_find_the_same_shards(wds):
  folder, _ = wds
  shards = sorted(os.path.join(folder, f) for f in os.listdir(folder))
  for path in (folder, os.path.join(folder, "*.tar"), os.path.join(folder, "{00000..00003}.tar")):
    fs, found = sources.find_files(path, ("tar",), "tar shards")
    assert found == shards, path
  _, one = sources.find_files(shards[1], ("tar",), "tar shards")
  assert one == [shards[1]]


def test_truncated_shard_keeps_the_readable_samples(tmp_path):
  path = str(tmp_path / "cut.tar")
  with tarfile.open(path, "w") as tar:
    for j in range(4):
      add_member(tar, f"{j:04d}.png", make_image(3 * j)[0])  # every third image is a PNG
      add_member(tar, f"{j:04d}.txt", b"photo")
  fs, _ = sources.filesystem(path)
  cut = int(sources.index_tar_shard(fs, path, ("png",), "txt").caption_offset[3]) + 2
  with open(path, "rb") as f:
    head = f.read(cut)
  with open(path, "wb") as f:
    f.write(head)  # ends inside the last caption
  source = sources.TarShardSource(fs, [path], image_extensions=("png",))
  assert len(source) == 4
  assert [source[j]["error"] for j in range(3)] == [None] * 3
  assert source[0]["caption"] == "photo" and source[0]["image"] == make_image(0)[0]
  assert "truncated" in source[3]["error"]


def _set_header_field(raw: bytearray, header: int, start: int, value: bytes) -> None:
  """Writes a field of the tar header at byte `header` and fixes the header's checksum."""
  raw[header + start:header + start + len(value)] = value
  block = raw[header:header + 512]
  block[148:156] = b" " * 8
  raw[header + 148:header + 156] = b"%06o\0 " % sum(block)


@pytest.mark.parametrize("hostile", ["image size", "long name"])
def test_hostile_tar_headers_are_bounded_by_the_file(tmp_path, monkeypatch, hostile):
  """A header whose size field says 2^62 (the image member's, or a GNU long-name header's,
  which tarfile would read whole) costs neither memory nor a crash: the sample is skipped
  with a reason, the samples before it are read."""
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
    for j in range(3):
      add_member(tar, f"{j:04d}.txt", b"photo")
      add_member(tar, f"{j:04d}.png", make_image(3 * j)[0])
  raw = bytearray(buffer.getvalue())
  headers, offset = [], 0
  while offset < len(raw) and any(raw[offset:offset + 512]):
    headers.append(offset)
    size = int(raw[offset + 124:offset + 135].decode().strip("\0 ") or "0", 8)
    offset += 512 + (size + 511) // 512 * 512
  assert len(headers) == 6
  _set_header_field(raw, headers[5], 124, bytes([0x80]) + (2**62).to_bytes(11, "big"))  # base-256 size
  if hostile == "long name":
    _set_header_field(raw, headers[5], 156, b"L")  # GNU long name: the next 2^62 bytes are a name
  path = tmp_path / "hostile.tar"
  path.write_bytes(bytes(raw))
  fs, _ = sources.filesystem(str(path))
  source = sources.TarShardSource(fs, [str(path)], image_extensions=("png",))
  assert len(source) == 3
  assert [source[j]["error"] for j in range(2)] == [None, None]
  assert source[0]["image"] == make_image(0)[0] and source[1]["caption"] == "photo"
  last = source[2]
  assert last["source"] == str(path) and last["index"] == 2
  if hostile == "image size":
    assert "image member is truncated" in last["error"] and str(2**62) in last["error"], last["error"]
  else:  # the long-name header ends the readable headers: sample 2 has its caption only
    assert last["error"] == "no image member (png)"
  # A member within the file but over the size limit is not read either.
  sizes = [len(make_image(3 * j)[0]) for j in range(2)]
  monkeypatch.setattr(sources, "MAX_IMAGE_BYTES", min(sizes))
  source = sources.TarShardSource(fs, [str(path)], image_extensions=("png",))
  for j in range(2):
    if sizes[j] > min(sizes):
      assert source[j]["error"] == f"the image member has {sizes[j]} bytes, over the limit of {min(sizes)} bytes"
    else:
      assert source[j]["error"] is None


# ----------------------------------------------------------------------------- wds batches


WDS_REASONS = {"corrupt": "cannot decode image", "truncated": "cannot decode image",
               "no caption": "no caption member", "no image": "no image member"}


def test_wds_centre_crop_pixels_tokens_and_skips(wds, tokenizer):
  folder, good = wds
  lookup = key_lookup(tokenizer, good)
  td = data(folder, tokenizer, shuffle=False)
  try:
    assert td.num_records == WDS_SHARDS * WDS_PER_SHARD and td.local_batch_size == 4
    first_epoch, named = [], []
    for _ in range(7):  # 28 good samples, in order
      first_epoch.append(next(td))
      named.append(td.take_skipped())
    for b in first_epoch:
      assert b["pixels"].shape == (4, R, R, 3) and b["pixels"].dtype == np.float32
      assert b["input_ids"].shape == (4, tokenizer.model_max_length) and b["input_ids"].dtype == np.int32
      assert b["num_skipped"].dtype == np.int64 and b["num_skipped"].shape == ()
      assert -1.0 <= b["pixels"].min() and b["pixels"].max() <= 1.0
    keys = keys_in(first_epoch, lookup)
    assert keys == sorted(good)  # in shard and member order, every good sample once
    pixels = np.concatenate([b["pixels"] for b in first_epoch])
    for key, row in zip(keys, pixels):
      np.testing.assert_allclose(row, expected_pixels(good[key][0]), atol=1e-6, err_msg=key)
    ids = np.concatenate([b["input_ids"] for b in first_epoch])
    np.testing.assert_array_equal(ids, ids_of(tokenizer, [good[k][1] for k in keys]))
    # The four bad samples (positions 2, 13, 17 and 28 of 32) are counted as they are
    # passed, once per epoch.
    assert [int(b["num_skipped"]) for b in first_epoch] == [1, 1, 1, 3, 3, 3, 4]
    # Each batch names the records skipped before its examples, not those read ahead: bad
    # sample (s, j) sits at stream position 8s + j, so it is skipped by the batch that holds
    # the first good sample after it (4 good samples per batch).
    expected = [[] for _ in range(7)]
    for (s, j), kind in sorted(WDS_BAD.items()):
      position = s * WDS_PER_SHARD + j
      good_before = position - sum(1 for (t, k) in WDS_BAD if t * WDS_PER_SHARD + k < position)
      expected[good_before // 4].append((os.path.join(folder, f"{s:05d}.tar"), j, f"{s:05d}{j:04d}", kind))
    assert [len(n) for n in named] == [len(e) for e in expected]
    for batch_named, batch_expected in zip(named, expected):
      for record, (source, index, key, kind) in zip(batch_named, batch_expected):
        assert record["source"] == source and record["index"] == index, record
        assert record["id"] == f"{source}:{key}" and record["reason"].startswith(WDS_REASONS[kind]), record
    assert int(take(td, 7)[-1]["num_skipped"]) == 8
    assert len(td.take_skipped()) == 4  # the second epoch's, once
  finally:
    td.close()


def test_random_crop_and_flip(wds, tokenizer):
  folder, good = wds
  lookup = key_lookup(tokenizer, good)
  td = data(folder, tokenizer, center_crop=False, random_flip=True)
  seen_flips, seen_origins = set(), set()
  try:
    for b in take(td, 14):
      for key, row in zip(keys_in([b], lookup), b["pixels"]):
        image = good[key][0]
        w, h = Image.open(io.BytesIO(image)).size
        size = (R, int(R * h / w)) if w <= h else (int(R * w / h), R)
        matches = [(top, left, flip) for top in range(size[1] - R + 1) for left in range(size[0] - R + 1)
                   for flip in (False, True)
                   if np.allclose(row, expected_pixels(image, top_left=(top, left), flip=flip), atol=1e-6)]
        assert matches, key
        seen_flips.update(m[2] for m in matches)
        if size != (R, R):
          seen_origins.update((key, m[0], m[1]) for m in matches)
  finally:
    td.close()
  assert seen_flips == {False, True}
  assert len({(t, l) for _, t, l in seen_origins}) > 3


def test_same_seed_same_batches_new_order_each_epoch(wds, tokenizer):
  folder, good = wds
  lookup = key_lookup(tokenizer, good)
  opts = dict(center_crop=False, random_flip=True)
  a, b, c = (data(folder, tokenizer, seed=s, **opts) for s in (0, 0, 1))
  try:
    first_a, first_b, first_c = take(a, 14), take(b, 14), take(c, 14)
  finally:
    for td in (a, b, c):
      td.close()
  assert_batches_equal(first_a, first_b)
  epoch1, epoch2 = keys_in(first_a[:7], lookup), keys_in(first_a[7:], lookup)
  assert sorted(epoch1) == sorted(epoch2) == sorted(good)  # each epoch: every good sample once
  assert epoch1 != epoch2 and epoch1 != sorted(good)  # shuffled, differently each epoch
  assert keys_in(first_c[:7], lookup) != epoch1  # another seed, another order


def test_tar_shards_are_split_whole_between_processes(wds, tokenizer):
  # 14 good samples per process: 14 batches of one sample cover a whole epoch of each.
  folder, good = wds
  lookup = key_lookup(tokenizer, good)
  shares = []
  for p in range(2):
    td = data(folder, tokenizer, batch=2, process_index=p, process_count=2)
    try:
      assert td.local_batch_size == 1
      shares.append(set(keys_in(take(td, 14), lookup)))
    finally:
      td.close()
  assert not shares[0] & shares[1]
  assert shares[0] | shares[1] == set(good)
  assert {k[:5] for k in shares[0]} == {"00000", "00002"}  # process 0 reads shards 0 and 2


@pytest.fixture(scope="module")
def clean_folder(tmp_path_factory):
  """An image folder of 12 usable records (captions "photo 200" ... "photo 211")."""
  folder = str(tmp_path_factory.mktemp("clean"))
  good = {}
  with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
    for i in range(12):
      image, ext = make_image(200 + i)
      with open(os.path.join(folder, f"{i:02d}.{ext}"), "wb") as img:
        img.write(image)
      f.write(json.dumps({"file_name": f"{i:02d}.{ext}", "text": caption_of(200 + i)}) + "\n")
      good[f"{i:02d}.{ext}"] = (image, caption_of(200 + i))
  return folder, good


def global_batches(folder, tokenizer, processes: int, n: int, state_after: int | None = None, **opts) -> list[dict]:
  """n global batches of 4 read by `processes` processes: each process's batch of every step,
  concatenated in process order (as `make_global_batch` lays them out)."""
  readers = [data(folder, tokenizer, format="imagefolder", batch=4, process_index=p, process_count=processes,
                  center_crop=False, random_flip=True, **opts) for p in range(processes)]
  try:
    per_process = [take(td, n) for td in readers]
  finally:
    for td in readers:
      td.close()
  return [{k: np.concatenate([b[s][k] for b in per_process]) for k in ("pixels", "input_ids")} for s in range(n)]


def test_global_batches_do_not_depend_on_the_process_count(clean_folder, tokenizer):
  """Process p reads its contiguous slice of every global batch: 1, 2 and 4 processes give the
  same records, the same augmentations and the same order; within an epoch the processes read
  disjoint records whose union is the data set."""
  folder, good = clean_folder
  lookup = key_lookup(tokenizer, good)
  one = global_batches(folder, tokenizer, 1, 6)  # 2 epochs of 3 global batches
  assert sorted(keys_in(one[:3], lookup)) == sorted(good)
  assert keys_in(one[:3], lookup) != keys_in(one[3:], lookup)  # reshuffled every epoch
  for processes in (2, 4):
    assert_batches_equal(global_batches(folder, tokenizer, processes, 6), one)
  readers = [data(folder, tokenizer, format="imagefolder", batch=4, process_index=p, process_count=2)
             for p in range(2)]
  try:
    shares = [keys_in(take(td, 3), lookup) for td in readers]  # one epoch
  finally:
    for td in readers:
      td.close()
  assert len(shares[0]) == len(shares[1]) == 6
  assert not set(shares[0]) & set(shares[1]) and sorted(shares[0] + shares[1]) == sorted(good)


def test_data_position_carries_over_to_another_process_count(clean_folder, wds, tokenizer):
  """A position saved by P processes resumes with P' processes at the same global batch."""
  folder, _ = clean_folder
  opts = dict(format="imagefolder", batch=4, center_crop=False, random_flip=True)
  expected = global_batches(folder, tokenizer, 1, 5)[2:]
  for saved_by, resumed_by in ((2, 1), (1, 4)):
    states = []
    for p in range(saved_by):
      td = data(folder, tokenizer, process_index=p, process_count=saved_by, **opts)
      take(td, 2)
      states.append(json.loads(json.dumps(td.get_state())))
      td.close()
    readers = [data(folder, tokenizer, process_index=p, process_count=resumed_by, **opts) for p in range(resumed_by)]
    try:
      for td in readers:
        td.resume_from_processes(states)
      per_process = [take(td, 3) for td in readers]
      again = readers[0].get_state()
    finally:
      for td in readers:
        td.close()
    resumed = [{k: np.concatenate([b[s][k] for b in per_process]) for k in ("pixels", "input_ids")} for s in range(3)]
    assert_batches_equal(resumed, expected)
    assert again["start_batch"] == 2 and again["batches"] == 3
  td = data(folder, tokenizer, **opts)
  try:
    with pytest.raises(LcmJaxError, match="another process layout"):  # set_state is for the same processes
      td.set_state({**states[0], "layout": {**states[0]["layout"], "process_count": 2}})
  finally:
    td.close()
  wds_states = []
  for p in range(2):
    td = data(wds[0], tokenizer, batch=2, process_index=p, process_count=2)
    wds_states.append(td.get_state())
    td.close()
  td = data(wds[0], tokenizer, batch=2)
  try:
    with pytest.raises(LcmJaxError, match="own whole shards, so resume with the same number of processes"):
      td.resume_from_processes(wds_states)
  finally:
    td.close()


def test_state_restore_continues_the_sequence(wds, tokenizer):
  folder, _ = wds
  opts = dict(center_crop=False, random_flip=True)
  for k in (3, 9):  # within the first epoch, and past its end
    td = data(folder, tokenizer, **opts)
    try:
      take(td, k)
      state = json.loads(json.dumps(td.get_state()))  # a JSON round trip, as checkpoints store it
      expected = take(td, 5)
    finally:
      td.close()
    fresh = data(folder, tokenizer, **opts)
    try:
      fresh.set_state(state)
      assert_batches_equal(take(fresh, 5), expected)
    finally:
      fresh.close()


def test_orbax_checkpoint_of_the_iterator(wds, tokenizer, tmp_path):
  """The snippet the train program uses: the grain iterator beside the train state."""
  import grain
  import jax.numpy as jnp
  import orbax.checkpoint as ocp
  folder, _ = wds
  train_data = data(folder, tokenizer, center_crop=False, random_flip=True)
  train_state = {"params": jnp.arange(3.0), "step": 4}
  take(train_data, 4)
  manager = ocp.CheckpointManager(str(tmp_path / "ckpt"), options=ocp.CheckpointManagerOptions(max_to_keep=2))
  manager.save(4, args=ocp.args.Composite(state=ocp.args.StandardSave(train_state),
                                          data=grain.checkpoint.CheckpointSave(train_data.iterator)))
  manager.wait_until_finished()
  expected = take(train_data, 3)
  train_data.close()

  resumed = data(folder, tokenizer, center_crop=False, random_flip=True)
  manager = ocp.CheckpointManager(str(tmp_path / "ckpt"))
  step = manager.latest_step()
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(train_state), data=grain.checkpoint.CheckpointRestore(resumed.iterator)))
  try:
    assert step == 4 and int(restored["state"]["step"]) == 4
    assert_batches_equal(take(resumed, 3), expected)
  finally:
    resumed.close()


def test_worker_processes_give_the_in_process_batches(wds, tokenizer):
  folder, _ = wds
  opts = dict(center_crop=False, random_flip=True)
  in_process = data(folder, tokenizer, **opts)
  workers = data(folder, tokenizer, num_workers=1, **opts)  # one worker: the same order
  try:
    expected = take(in_process, 4)
    assert_batches_equal(take(workers, 4), expected)
    json.dumps(workers.get_state())
  finally:
    in_process.close()
    workers.close()


# ----------------------------------------------------------------------------- other formats


def test_imagefolder(imagefolder, tokenizer):
  folder, good = imagefolder
  lookup = key_lookup(tokenizer, good)
  td = data(folder, tokenizer, format="imagefolder", shuffle=False, batch=3)
  try:
    assert td.num_records == 14  # 12 images + 2 metadata rows without a usable file
    batches = take(td, 3)
  finally:
    td.close()
  keys = keys_in(batches, lookup)
  assert sorted(keys) == sorted(good)
  for key, row in zip(keys, np.concatenate([b["pixels"] for b in batches])):
    np.testing.assert_allclose(row, expected_pixels(good[key][0]), atol=1e-6, err_msg=key)
  assert int(batches[-1]["num_skipped"]) == 3  # corrupt, no line, no text; the 2 orphans come last


def test_remote_paths_through_fsspec(wds, tokenizer):
  import fsspec
  folder, good = wds
  memory = fsspec.filesystem("memory")
  for name in sorted(os.listdir(folder)):
    with open(os.path.join(folder, name), "rb") as f:
      memory.pipe(f"/lcm-test-bucket/shards/{name}", f.read())
  remote = data("memory://lcm-test-bucket/shards/{00000..00003}.tar", tokenizer, center_crop=False, random_flip=True)
  local = data(folder, tokenizer, center_crop=False, random_flip=True)
  try:
    assert_batches_equal(take(remote, 8), take(local, 8))
  finally:
    remote.close()
    local.close()
  with pytest.raises(LcmJaxError, match="matches no tar shards"):
    data("memory://lcm-test-bucket/nothing/*.tar", tokenizer)


@functools.cache
def tiny_tfds_builder():
  """A TFDS builder of (image, caption) pairs; registered once per process by its name."""
  import tensorflow_datasets as tfds

  class LcmTinyCaptions(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3)), "caption": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      yield 0, {"image": np.zeros((8, 8, 3), np.uint8), "caption": "photo"}

  return "lcm_tiny_captions"


def test_tfds_with_mock_data(tokenizer):
  tfds = pytest.importorskip("tensorflow_datasets")
  name = tiny_tfds_builder()
  with tfds.testing.mock_data(num_examples=10):
    td = data("", tokenizer, format="tfds", tfds_name=name, shuffle=False, batch=5)
    try:
      assert td.num_records == 10
      batches = take(td, 2)
    finally:
      td.close()
    reference = tfds.data_source(name, split="train")
    examples = [reference[i] for i in range(10)]
  pixels = np.concatenate([b["pixels"] for b in batches])
  ids = np.concatenate([b["input_ids"] for b in batches])
  for i, ex in enumerate(examples):
    np.testing.assert_allclose(pixels[i], expected_pixels(ex["image"]), atol=1e-6)
  np.testing.assert_array_equal(ids, ids_of(tokenizer, [ex["caption"] for ex in examples]))
  assert int(batches[-1]["num_skipped"]) == 0


# ----------------------------------------------------------------------------- latent cache


@pytest.fixture(scope="module")
def latent_cache(tiny_pipeline, imagefolder, tmp_path_factory):
  from lcm_jax.data.cache import cache_latents
  from lcm_jax.load import load_pipeline
  folder, _ = imagefolder
  path = tiny_pipeline("sd1")
  pipe = load_pipeline(path, components=("vae", "text_encoder", "tokenizer"))
  output = str(tmp_path_factory.mktemp("latents"))
  config = default_data_config()
  config.update(path=folder, format="imagefolder")
  metadata = cache_latents(pipe, config, resolution=R, output=output, batch_size=4, shard_size=4, progress=False)
  return pipe, output, metadata


def read_cache(output: str) -> list[tuple[dict, str]]:
  import grain
  metadata = latents_lib.read_metadata(output)
  layout = latents_lib.layout_from_metadata(metadata)
  source = grain.sources.ArrayRecordDataSource([os.path.join(output, s) for s in metadata["shards"]])
  return [layout.decode(source[i]) for i in range(len(source))]


def test_latent_cache_holds_the_vae_posterior_and_text_states(latent_cache, imagefolder):
  import jax.numpy as jnp

  from lcm_jax.models.vae import AutoencoderKL
  from lcm_jax.tokenizer import tokenize
  pipe, output, metadata = latent_cache
  _, good = imagefolder
  assert metadata["count"] == 9 and metadata["skipped"] == 5
  assert metadata["latent_shape"] == [R // 2, R // 2, 4] and metadata["text_shape"] == [16, 32]
  assert metadata["vae_scaling_factor"] == pipe.vae_scaling_factor and metadata["resolution"] == R
  assert metadata["shards"] == ["latents-00000.array_record", "latents-00001.array_record",
                                "latents-00002.array_record"]
  records = read_cache(output)
  by_caption = {caption: key for key, (_, caption) in good.items()}
  keys = [by_caption[caption] for _, caption in records]
  assert keys == sorted(good)  # data set order

  pixels = np.stack([expected_pixels(good[k][0]) for k in keys])
  mean, logvar = pipe.vae.apply({"params": pipe.params["vae"]}, jnp.asarray(pixels), method=AutoencoderKL.encode)
  ids = tokenize(pipe.tokenizer, [good[k][1] for k in keys])
  context, _ = pipe.text_encoder.apply({"params": pipe.params["text_encoder"]}, jnp.asarray(ids))
  stored = {name: np.stack([r[0][name] for r in records]) for name in latents_lib.FIELDS}
  np.testing.assert_allclose(stored["latent_mean"], mean, atol=1e-5)
  np.testing.assert_allclose(stored["latent_logvar"], logvar, atol=1e-5)
  np.testing.assert_allclose(stored["context"], context, atol=1e-5)

  import diffusers
  import torch
  vae = diffusers.AutoencoderKL.from_pretrained(os.path.join(pipe.path, "vae")).eval()
  with torch.no_grad():
    reference = vae.encode(torch.from_numpy(pixels).permute(0, 3, 1, 2)).latent_dist
  ref_mean = reference.mean.permute(0, 2, 3, 1).numpy()
  bound = 1e-4 * max(1.0, float(np.abs(ref_mean).max()))
  assert np.abs(stored["latent_mean"] - ref_mean).max() <= bound
  ref_logvar = reference.logvar.permute(0, 2, 3, 1).numpy()
  assert np.abs(stored["latent_logvar"] - ref_logvar).max() <= 1e-4 * max(1.0, float(np.abs(ref_logvar).max()))


def test_latents_train_data(latent_cache, tmp_path):
  _, output, metadata = latent_cache
  records = read_cache(output)
  td = data(output, None, format="latents", shuffle=False, batch=3)
  try:
    assert td.latents_metadata["vae_scaling_factor"] == metadata["vae_scaling_factor"]
    batches = take(td, 3)
  finally:
    td.close()
  for name in latents_lib.FIELDS:
    got = np.concatenate([b[name] for b in batches])
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, np.stack([r[0][name] for r in records]))
  assert batches[0]["latent_mean"].shape == (3, R // 2, R // 2, 4) and batches[0]["context"].shape == (3, 16, 32)
  assert int(batches[-1]["num_skipped"]) == 0

  # A damaged record is skipped and counted; shuffled latents restore like images.
  damaged = str(tmp_path / "damaged")
  os.makedirs(damaged)
  from array_record.python.array_record_module import ArrayRecordWriter
  layout = latents_lib.layout_from_metadata(metadata)
  writer = ArrayRecordWriter(os.path.join(damaged, latents_lib.shard_name(0)), "group_size:1")
  encoded = [layout.encode(r[0], r[1]) for r in records]
  for i, record in enumerate(encoded):
    writer.write(record[:100] if i == 2 else record)
  writer.close()
  latents_lib.write_metadata(damaged, {**metadata, "shards": [latents_lib.shard_name(0)]})
  td = data(damaged, None, format="latents", shuffle=False, batch=4)
  try:
    assert int(take(td, 2)[-1]["num_skipped"]) == 1
  finally:
    td.close()
  td = data(damaged, None, format="latents", batch=4)
  try:
    take(td, 2)
    state = td.get_state()
    expected = take(td, 3)
  finally:
    td.close()
  td = data(damaged, None, format="latents", batch=4)
  try:
    td.set_state(state)
    assert_batches_equal(take(td, 3), expected)
  finally:
    td.close()

  with pytest.raises(LcmJaxError, match="resolution 16"):
    make_train_data({"path": output, "format": "latents"}, resolution=32, global_batch_size=2, seed=0,
                    process_index=0, process_count=1)
  with pytest.raises(LcmJaxError, match="random_flip"):
    data(output, None, format="latents", random_flip=True)


def test_cache_latents_refuses_to_overwrite(latent_cache, imagefolder):
  from lcm_jax.data.cache import cache_latents
  pipe, output, _ = latent_cache
  config = default_data_config()
  config.update(path=imagefolder[0], format="imagefolder")
  with pytest.raises(LcmJaxError, match="already holds a latent cache; pass --overwrite"):
    cache_latents(pipe, config, resolution=R, output=output, progress=False)
  with pytest.raises(LcmJaxError, match="not a positive multiple of the VAE's downsampling factor 2"):
    cache_latents(pipe, config, resolution=15, output=output + "-15", progress=False)


def run_cli(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
  return subprocess.run([sys.executable, "-m", "lcm_jax.cache_latents", *args], capture_output=True, text=True,
                        env=env, cwd=REPO, timeout=300)


def test_cache_latents_cli(tiny_pipeline, wds, tmp_path):
  folder, good = wds
  output = str(tmp_path / "cache")
  result = run_cli(f"--model={tiny_pipeline('sd1')}", f"--data_path={folder}/{{00000..00003}}.tar",
                   "--data_format=wds", f"--resolution={R}", f"--output={output}", "--batch_size=8")
  assert result.returncode == 0, result.stderr
  assert f"cached {len(good)} images ({len(WDS_BAD)} skipped)" in result.stdout
  assert latents_lib.read_metadata(output)["count"] == len(good)
  missing = run_cli(f"--model={tiny_pipeline('sd1')}", f"--data_path={tmp_path}/none/*.tar", f"--resolution={R}",
                    f"--output={tmp_path}/other")
  assert missing.returncode == 2
  assert missing.stderr.strip().splitlines() == [
      f"error: data path {tmp_path}/none/*.tar matches no tar shards (looked for a file, a folder of .tar files, "
      "a glob or a {a..b} brace pattern)"]


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs(tmp_path, wds, tokenizer, monkeypatch):
  folder, _ = wds
  (tmp_path / "empty").mkdir()
  with pytest.raises(LcmJaxError, match=r"matches no tar shards"):
    data(str(tmp_path / "empty"), tokenizer)
  with pytest.raises(LcmJaxError, match=r"matches no tar shards"):
    data(str(tmp_path / "nowhere" / "shard-{000..009}.tar"), tokenizer)
  with pytest.raises(LcmJaxError, match=r"unknown data format 'parquet'"):
    data(folder, tokenizer, format="parquet")
  with pytest.raises(LcmJaxError, match=r"unknown data config keys \['resolution'\]"):
    make_train_data({"path": folder, "resolution": 3}, resolution=R, global_batch_size=2, seed=0,
                    tokenizer=tokenizer, process_index=0, process_count=1)
  with pytest.raises(LcmJaxError, match=r"not a positive multiple of the process count 2"):
    data(folder, tokenizer, batch=3, process_index=0, process_count=2)
  with pytest.raises(LcmJaxError, match=r"needs the pipeline's tokenizer"):
    data(folder, None)
  with pytest.raises(LcmJaxError, match=r"4 tar shard\(s\) cannot be split over 8 processes"):
    data(folder, tokenizer, batch=8, process_index=0, process_count=8)
  # An empty data set.
  (tmp_path / "empty" / "metadata.jsonl").write_text("")
  with pytest.raises(LcmJaxError, match=r"is empty: no records"):
    data(str(tmp_path / "empty"), tokenizer, format="imagefolder")
  with pytest.raises(LcmJaxError, match=r"has no metadata.jsonl"):
    data(folder, tokenizer, format="imagefolder")
  with pytest.raises(LcmJaxError, match=r"is not a folder"):
    data(str(tmp_path / "nowhere"), tokenizer, format="imagefolder")
  # A data set whose every record is unusable stops with the reason instead of spinning.
  (tmp_path / "gz").mkdir()
  with tarfile.open(tmp_path / "gz" / "0.tar", "w:gz") as tar:
    add_member(tar, "0.png", make_image(0)[0])
  td = data(str(tmp_path / "gz"), tokenizer)
  with pytest.raises(LcmJaxError, match=r"all unusable.*cannot read tar shard"):
    next(td)
  td.close()
  # Latent caches.
  with pytest.raises(LcmJaxError, match=r"has no metadata.json"):
    data(str(tmp_path / "empty"), None, format="latents")
  with pytest.raises(LcmJaxError, match=r"latent cache .*nowhere does not exist"):
    data(str(tmp_path / "nowhere"), None, format="latents")
  with pytest.raises(LcmJaxError, match=r"needs a local path"):
    data("memory://bucket/cache", None, format="latents")
  # TFDS without the extra.
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(LcmJaxError, match=r"pip install 'lcm-jax\[tfds\]'"):
    data("", tokenizer, format="tfds", tfds_name="coco_captions")
  # A remote filesystem whose package is missing.
  import importlib.util
  if importlib.util.find_spec("gcsfs") is None:
    with pytest.raises(LcmJaxError, match=r"pip install gcsfs"):
      data("gs://some-bucket/shards/{000..009}.tar", tokenizer)
