"""fashion_tagger.storage: one behaviour suite run on a local folder and on S3 (moto's server on loopback): round
trips, listing, bad locations and keys, atomic publication, the scratch cache, shards, and failures in the contract.
"""

from __future__ import annotations

import hashlib
import io as _io
import json
import os
import tarfile
import threading
import time
import uuid
from pathlib import Path

import pytest
from moto_server import MOTO_ENV, moto_s3_server, pause, resume
from native_stack import free_port

from fashion_tagger.core.errors import ConfigError, DataError, SourceError, SourceUnavailableError
from fashion_tagger.storage import shards
from fashion_tagger.storage.local import LocalStore
from fashion_tagger.storage.publish import MANIFEST_NAME, is_published, publish, read_manifest
from fashion_tagger.storage.s3 import S3Store
from fashion_tagger.storage.scratch import SCRATCH_ENV, object_path, scratch_root, stage_in
from fashion_tagger.storage.store import open_store

BAD_KEYS = ["/etc/passwd", "../outside", "runs/../../x", "runs//split", "./runs", "runs\\x", ""]


@pytest.fixture(scope="module")
def s3_endpoint():
    with moto_s3_server() as endpoint:
        yield endpoint


def _s3_env(monkeypatch, endpoint: str) -> None:
    for name, value in {**MOTO_ENV, "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(name, value)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.services)])
def store(request, tmp_path, monkeypatch):
    """An empty store, opened from its location as a user would write it."""
    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    endpoint = request.getfixturevalue("s3_endpoint")
    _s3_env(monkeypatch, endpoint)
    bucket = f"home-{uuid.uuid4().hex[:12]}"
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    return open_store(f"s3://{bucket}/ft/home")


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


OUTPUTS = {"train.parquet": b"t" * 1000, "labels.json": b'{"a": 1}', "plots/loss.png": b"\x89PNG" + b"x" * 50}


# --- the Store interface -------------------------------------------------------------------------------------------


def test_objects_round_trip_through_bytes_and_files(store, tmp_path):
    key = "runs/r1/split/train.parquet"
    assert not store.exists(key)
    store.write_bytes(key, b"first")
    assert store.exists(key) and store.read_bytes(key) == b"first"
    store.write_bytes(key, b"second")  # overwriting is one atomic put
    assert store.read_bytes(key) == b"second"

    src = tmp_path / "weights.bin"
    src.write_bytes(os.urandom(300_000))
    store.upload(src, "weights/w.bin")
    dest = store.download("weights/w.bin", tmp_path / "down" / "w.bin")
    assert dest.read_bytes() == src.read_bytes()
    assert store.url(key).endswith("/runs/r1/split/train.parquet")
    assert store.url(key).startswith("s3://") == isinstance(store, S3Store)


def test_a_large_file_goes_up_in_parts_and_comes_back_whole(store, tmp_path, monkeypatch):
    monkeypatch.setattr("fashion_tagger.storage.s3.MULTIPART_BYTES", 1 << 20)  # S3's parts are 8 MB here
    src = tmp_path / "last.ckpt"
    src.write_bytes(os.urandom(9 << 20))
    store.upload(src, "runs/r1/train/last.ckpt")
    assert store.download("runs/r1/train/last.ckpt", tmp_path / "back").read_bytes() == src.read_bytes()


def test_listing_is_by_folder_sorted_and_deleting_takes_a_folder(store):
    for key in ["runs/b/x", "runs/a/2", "runs/a/1", "runs/ab/1", "raw/d/styles.csv"]:
        store.write_bytes(key, key.encode())
    assert store.list("runs/a") == ["runs/a/1", "runs/a/2"]  # not runs/ab
    assert store.list("runs/a/") == ["runs/a/1", "runs/a/2"]
    assert store.list() == sorted(["runs/b/x", "runs/a/2", "runs/a/1", "runs/ab/1", "raw/d/styles.csv"])
    assert store.list("nothing/here") == []
    assert store.delete_prefix("runs/a") == 2
    assert store.list("runs") == ["runs/ab/1", "runs/b/x"]
    with pytest.raises(SourceError, match="needs a prefix"):
        store.delete_prefix("")
    store.delete("runs/b/x")
    store.delete("runs/b/x")  # gone already: no error
    assert not store.exists("runs/b/x")


def test_a_missing_key_is_bad_input_naming_it(store, tmp_path):
    with pytest.raises(SourceError, match="runs/none/state") as caught:
        store.read_bytes("runs/none/state")
    assert not caught.value.retryable
    with pytest.raises(SourceError, match="runs/none/ckpt"):
        store.download("runs/none/ckpt", tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("key", BAD_KEYS)
def test_keys_that_are_absolute_or_climb_out_are_refused_naming_them(store, key):
    with pytest.raises(SourceError, match="is not a relative POSIX path") as caught:
        store.write_bytes(key, b"x")
    assert repr(key) in str(caught.value)


@pytest.mark.parametrize("location", ["gs://bucket/home", "http://minio:9000/home", "s3:/ft/home", "s3://",
                                      "s3:///home", "s3://Upper/home", "s3://ft/../home", "  "])
def test_unsupported_locations_are_one_line_config_errors(location, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as caught:
        open_store(location)
    message = str(caught.value)
    assert "\n" not in message and "s3://bucket/prefix" in message
    assert location.strip() == "" or repr(location) in message
    assert list(tmp_path.iterdir()) == []  # never a local folder named after the URL


def test_locations_open_the_store_they_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert open_store(tmp_path / "h").location == str(tmp_path / "h")
    relative = open_store("home")
    assert isinstance(relative, LocalStore) and relative.location == str(tmp_path / "home")
    s3 = open_store("s3://ft-home/runs/prod/")
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix) == ("ft-home", "runs/prod")
    assert s3.url("a/b") == "s3://ft-home/runs/prod/a/b" and open_store("s3://ft-home").location == "s3://ft-home"


def test_the_moved_s3_helpers_are_still_importable_from_data_sources():
    from fashion_tagger.data import sources
    from fashion_tagger.storage import s3

    assert (sources.s3_errors, sources.connect_s3, sources.list_keys) == (s3.s3_errors, s3.connect_s3, s3.list_keys)


# --- failures of the endpoint --------------------------------------------------------------------------------------


def test_an_endpoint_that_does_not_answer_is_transient(tmp_path, monkeypatch):
    _s3_env(monkeypatch, f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries would only make the test slower
    store = open_store("s3://ft/home")
    (tmp_path / "out").mkdir()
    calls = [lambda: store.exists("a"), lambda: store.read_bytes("a"), lambda: store.list("runs"),
             lambda: publish(store, tmp_path / "out", "runs/r1/split")]
    for call in calls:
        with pytest.raises(SourceUnavailableError, match="s3://ft/home.*did not answer") as caught:
            call()
        assert caught.value.retryable


@pytest.mark.services
def test_a_missing_bucket_is_bad_input_naming_it(s3_endpoint, monkeypatch):
    _s3_env(monkeypatch, s3_endpoint)
    store = open_store("s3://no-such-bucket/home")
    with pytest.raises(SourceError, match="s3://no-such-bucket/home/runs.*NoSuchBucket"):
        store.list("runs")
    with pytest.raises(SourceError, match="s3://no-such-bucket/home/runs/x.*NoSuchBucket"):
        store.write_bytes("runs/x", b"1")


# --- publication ---------------------------------------------------------------------------------------------------


def test_publish_writes_every_file_then_the_manifest(store, tmp_path):
    local = _tree(tmp_path / "split", OUTPUTS)
    assert not is_published(store, "runs/r1/split")
    result = publish(store, local, "runs/r1/split")
    assert (result.files, result.uploaded) == (3, 3)
    assert is_published(store, "runs/r1/split")
    manifest = read_manifest(store, "runs/r1/split")
    assert {name: (e.sha256, e.size) for name, e in manifest.items()} == {
        name: (hashlib.sha256(data).hexdigest(), len(data)) for name, data in OUTPUTS.items()}
    assert store.list("runs/r1/split") == sorted(f"runs/r1/split/{n}" for n in [*OUTPUTS, MANIFEST_NAME])

    # Republished with one file changed, one gone and one new: only the changed and the new one go up.
    (local / "labels.json").write_bytes(b'{"a": 2}')
    (local / "plots/loss.png").unlink()
    (local / "fingerprint.txt").write_bytes(b"abc")
    again = publish(store, local, "runs/r1/split")
    assert (again.files, again.uploaded) == (3, 2)
    assert sorted(read_manifest(store, "runs/r1/split")) == ["fingerprint.txt", "labels.json", "train.parquet"]
    assert not store.exists("runs/r1/split/plots/loss.png")
    assert store.read_bytes("runs/r1/split/labels.json") == b'{"a": 2}'


class Killed(BaseException):
    """What SIGKILL does to a stage in the middle of its uploads: nothing after it runs."""


def _kill_after(store, uploads: int) -> None:
    """STORE dies after UPLOADS more uploads; `del store.upload` revives it."""
    upload, done = store.upload, []

    def dying_upload(src, key):
        if len(done) >= uploads:
            raise Killed
        done.append(key)
        upload(src, key)

    store.upload = dying_upload


def test_a_stage_killed_between_its_uploads_publishes_nothing(store, tmp_path):
    store.transfer_threads = 1  # one upload at a time, so the kill falls between two files
    local = _tree(tmp_path / "split", OUTPUTS)
    _kill_after(store, 2)
    with pytest.raises(Killed):
        publish(store, local, "runs/r1/split")
    assert len(store.list("runs/r1/split")) == 2  # files are there ...
    assert not is_published(store, "runs/r1/split")  # ... but nothing reads them as complete
    with pytest.raises(SourceError, match="is not published"):
        stage_in(store, "runs/r1/split", tmp_path / "in", scratch=tmp_path / "scratch")


def test_a_killed_republication_unpublishes_rather_than_mixing_old_and_new(store, tmp_path):
    store.transfer_threads = 1
    local = _tree(tmp_path / "split", OUTPUTS)
    publish(store, local, "runs/r1/split")
    _tree(local, {name: data + b"-v2" for name, data in OUTPUTS.items()})
    _kill_after(store, 1)
    with pytest.raises(Killed):
        publish(store, local, "runs/r1/split")
    assert not is_published(store, "runs/r1/split")
    del store.upload
    assert publish(store, local, "runs/r1/split").uploaded == 3
    assert store.read_bytes("runs/r1/split/labels.json") == OUTPUTS["labels.json"] + b"-v2"


def _pause_after_first_upload(store, endpoint: str, seconds: float) -> threading.Timer:
    """STORE's endpoint stops answering for SECONDS once STORE's first upload is done (the Timer that ends it)."""
    upload, timer = store.upload, threading.Timer(seconds, resume, args=(endpoint,))

    def upload_then_pause(src, key):
        upload(src, key)
        if not timer.is_alive() and not timer.finished.is_set():
            pause(endpoint)
            timer.start()

    store.upload = upload_then_pause
    return timer


@pytest.mark.services
def test_the_endpoint_unreachable_for_30_s_while_a_stage_stages_out(s3_endpoint, tmp_path, monkeypatch):
    """moto's server stopped (SIGSTOP: connections open, no answer) after the first of a stage's uploads. The
    default patience (60 s a request) waits a 30 s outage out and the publication completes; a client that gives
    up sooner fails the stage as transient with nothing published, and the retry publishes everything."""
    _s3_env(monkeypatch, s3_endpoint)
    bucket = f"home-{uuid.uuid4().hex[:12]}"
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    local = _tree(tmp_path / "split", OUTPUTS)

    store = open_store(f"s3://{bucket}/patient")
    store.transfer_threads = 1
    outage = _pause_after_first_upload(store, s3_endpoint, 30)
    started = time.monotonic()
    result = publish(store, local, "runs/r1/split")
    assert time.monotonic() - started >= 30 and not outage.is_alive()
    assert result.uploaded == 3 and is_published(store, "runs/r1/split")
    assert set(read_manifest(store, "runs/r1/split")) == set(OUTPUTS)

    monkeypatch.setenv("FASHION_TAGGER_S3_TIMEOUT_S", "2")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    store = open_store(f"s3://{bucket}/impatient")
    store.transfer_threads = 1
    outage = _pause_after_first_upload(store, s3_endpoint, 12)
    with pytest.raises(SourceUnavailableError, match=r"s3://.*/impatient.*did not answer") as caught:
        publish(store, local, "runs/r1/split")
    assert caught.value.retryable  # the CLI exits 75 and Airflow retries the task
    outage.join()
    assert not is_published(store, "runs/r1/split")  # one file went up, and no reader takes it as complete
    del store.upload
    assert publish(store, local, "runs/r1/split").files == 3  # the retry
    assert is_published(store, "runs/r1/split")

    monkeypatch.setenv("FASHION_TAGGER_S3_TIMEOUT_S", "soon")
    with pytest.raises(SourceError, match=r"\$FASHION_TAGGER_S3_TIMEOUT_S='soon': give the seconds"):
        open_store(f"s3://{bucket}/x").list("runs")


# --- the scratch cache ---------------------------------------------------------------------------------------------


def test_stage_in_downloads_each_file_once_and_links_it(store, tmp_path):
    publish(store, _tree(tmp_path / "split", OUTPUTS), "runs/r1/split")
    scratch = tmp_path / "scratch"
    first = stage_in(store, "runs/r1/split", tmp_path / "a", scratch=scratch)
    assert (first.files, first.downloads, first.cache_hits) == (3, 3, 0)
    assert first.bytes_downloaded == sum(len(d) for d in OUTPUTS.values())
    for name, data in OUTPUTS.items():
        assert (tmp_path / "a" / name).read_bytes() == data
        cached = object_path(scratch, hashlib.sha256(data).hexdigest())
        assert os.path.samefile(cached, tmp_path / "a" / name)  # a hard link, not a second copy

    second = stage_in(store, "runs/r1/split", tmp_path / "b", scratch=scratch)  # another stage, same worker
    assert (second.downloads, second.cache_hits, second.bytes_downloaded) == (0, 3, 0)
    assert (tmp_path / "b" / "plots/loss.png").read_bytes() == OUTPUTS["plots/loss.png"]


def test_stage_in_copies_where_it_cannot_link(tmp_path, monkeypatch):
    store = open_store(tmp_path / "store")
    publish(store, _tree(tmp_path / "split", OUTPUTS), "runs/r1/split")

    def no_links(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    result = stage_in(store, "runs/r1/split", tmp_path / "a", scratch=tmp_path / "scratch")
    assert result.downloads == 3 and (tmp_path / "a" / "labels.json").read_bytes() == OUTPUTS["labels.json"]
    assert (tmp_path / "a" / "labels.json").stat().st_nlink == 1


def test_a_corrupted_cached_object_is_fetched_again(store, tmp_path):
    publish(store, _tree(tmp_path / "split", OUTPUTS), "runs/r1/split")
    scratch = tmp_path / "scratch"
    stage_in(store, "runs/r1/split", tmp_path / "a", scratch=scratch)
    cached = object_path(scratch, hashlib.sha256(OUTPUTS["train.parquet"]).hexdigest())
    cached.chmod(0o644)
    cached.write_bytes(b"T" * 1000)  # same size, other content: only the hash tells
    again = stage_in(store, "runs/r1/split", tmp_path / "b", scratch=scratch)
    assert (again.downloads, again.cache_hits) == (1, 2)
    assert (tmp_path / "b" / "train.parquet").read_bytes() == OUTPUTS["train.parquet"]
    assert cached.read_bytes() == OUTPUTS["train.parquet"]


def test_the_scratch_folder_comes_from_the_environment_else_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv(SCRATCH_ENV, str(tmp_path / "mine"))
    assert scratch_root() == tmp_path / "mine"
    monkeypatch.delenv(SCRATCH_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert scratch_root() == tmp_path / "cache" / "fashion-tagger" / "scratch"


# --- shards --------------------------------------------------------------------------------------------------------


def _images(folder: Path, count: int) -> dict[str, Path]:
    files = {}
    for i in range(count):
        data = f"jpeg {i}".encode() * (i + 1)
        path = folder / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files[f"{hashlib.sha256(data).hexdigest()}.jpg"] = path
    return files


def test_shards_round_trip_deterministically_and_split_by_count_and_size(tmp_path):
    files = _images(tmp_path / "images", 25)
    made = shards.pack(files, tmp_path / "shards", max_files=10)
    assert [p.name for p in made] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    index = shards.read_index(tmp_path / "shards")
    assert [len(s["members"]) for s in index] == [10, 10, 5]
    assert [m for s in index for m in s["members"]] == sorted(files)  # sorted by name across shards
    with tarfile.open(made[0]) as tar:
        assert tar.getnames() == index[0]["members"] and {m.mtime for m in tar.getmembers()} == {0}

    unpacked = shards.unpack_all(tmp_path / "shards", tmp_path / "out")
    assert len(unpacked) == 25
    assert all((tmp_path / "out" / name).read_bytes() == path.read_bytes() for name, path in files.items())

    first = [p.read_bytes() for p in made]
    assert [p.read_bytes() for p in shards.pack(files, tmp_path / "shards", max_files=10)] == first  # identical
    by_size = shards.pack(files, tmp_path / "by_size", max_bytes=1000)
    assert len(by_size) > 1 and all(_content_bytes(p) <= 1000 for p in by_size)


def _content_bytes(shard: Path) -> int:
    with tarfile.open(shard) as tar:
        return sum(m.size for m in tar.getmembers())


def _evil_shard(path: Path, member: tarfile.TarInfo) -> Path:
    with tarfile.open(path, "w") as tar:
        good = tarfile.TarInfo("fine.jpg")
        good.size = 3
        tar.addfile(good, _io.BytesIO(b"abc"))
        tar.addfile(member, _io.BytesIO(b"x" * member.size) if member.isreg() else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, linkname, 1 if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize("member, reason", [
    (_member("../../etc/cron.d/x"), "absolute name or a '..' part"),
    (_member("/etc/passwd"), "absolute name or a '..' part"),
    (_member("a/../../b.jpg"), "absolute name or a '..' part"),
    (_member("link.jpg", tarfile.SYMTYPE, "/etc/shadow"), "is a link"),
    (_member("hard.jpg", tarfile.LNKTYPE, "fine.jpg"), "is a link"),
    (_member("dev.jpg", tarfile.CHRTYPE), "device"),
])
def test_unpack_refuses_unsafe_members_naming_them_and_writes_nothing(tmp_path, member, reason):
    shard = _evil_shard(tmp_path / "shard-000000.tar", member)
    with pytest.raises(DataError, match=reason) as caught:
        shards.unpack(shard, tmp_path / "out")
    assert repr(member.name) in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_a_shard_index_that_pack_did_not_write_is_refused(tmp_path):
    (tmp_path / shards.INDEX_NAME).write_text(json.dumps({"format": 9, "shards": []}))
    with pytest.raises(DataError, match="not a shard index"):
        shards.read_index(tmp_path)


def test_sharded_images_go_through_the_store_in_a_few_objects(store, tmp_path):
    files = _images(tmp_path / "images", 30)
    shards.pack(files, tmp_path / "shards", max_files=10)
    assert publish(store, tmp_path / "shards", "cache/shards/240x320").files == 4  # three shards and the index
    staged = stage_in(store, "cache/shards/240x320", tmp_path / "in", scratch=tmp_path / "scratch")
    assert staged.downloads == 4
    shards.unpack_all(tmp_path / "in", tmp_path / "images-in")
    assert sorted(p.name for p in (tmp_path / "images-in").iterdir()) == sorted(files)
    assert stage_in(store, "cache/shards/240x320", tmp_path / "in2", scratch=tmp_path / "scratch").downloads == 0


def test_a_packed_folder_is_a_few_objects_and_unpacks_to_the_same_files(store, tmp_path):
    """A raw dataset's layout (styles.csv and images/) published as shards: three objects instead of 41, staged
    in on another machine into the same files, unpacked once per machine."""
    from fashion_tagger.storage.packed import PACKED_DIRNAME, is_packed, publish_packed, unpack_staged

    raw = tmp_path / "raw"
    _images(raw / "images", 40)
    (raw / "styles.csv").write_text("id,gender\n0,Men\n")
    (raw / ".styles.csv.tmp").write_text("a write in progress")  # not published
    result = publish_packed(store, raw, "raw/fashion", work=tmp_path / "work")
    assert result.files == 41
    keys = store.list("raw/fashion")
    assert sorted(k.removeprefix("raw/fashion/") for k in keys) == [
        MANIFEST_NAME, f"{PACKED_DIRNAME}/shard-000000.tar", f"{PACKED_DIRNAME}/shards.json"]
    assert not list((tmp_path / "work").iterdir())  # the shards went up and their working folder with them

    into, scratch = tmp_path / "other-machine" / "raw" / "fashion", tmp_path / "other-scratch"
    stage_in(store, "raw/fashion", into, scratch=scratch)
    assert is_packed(into)
    assert unpack_staged(into) == 41
    assert not is_packed(into) and not (into / PACKED_DIRNAME).exists()
    originals = {p.relative_to(raw) for p in raw.rglob("*") if p.is_file() and not p.name.endswith(".tmp")}
    assert {p.relative_to(into) for p in into.rglob("*") if p.is_file() and not p.name.startswith(".")} == originals
    assert all((into / rel).read_bytes() == (raw / rel).read_bytes() for rel in originals)

    stage_in(store, "raw/fashion", into, scratch=scratch)  # a later stage on the same machine
    assert unpack_staged(into) == 0 and (into / "styles.csv").is_file()


def test_a_full_scratch_folder_is_a_transient_error_naming_it_and_the_retry_succeeds(store, tmp_path, monkeypatch):
    """Too little space is found before anything is downloaded; running out mid-write (ENOSPC injected at the
    write) leaves no partial file; once there is room the same stage-in succeeds."""
    import errno
    import shutil

    from fashion_tagger.core import io as core_io
    from fashion_tagger.core.errors import ScratchFullError
    from fashion_tagger.storage import scratch as scratch_module

    publish(store, _tree(tmp_path / "split", OUTPUTS), "runs/r1/split")
    scratch, into = tmp_path / "scratch", tmp_path / "into"
    real_usage = shutil.disk_usage
    monkeypatch.setattr(scratch_module.shutil, "disk_usage", lambda path: real_usage(path)._replace(free=1_000_000))
    with pytest.raises(ScratchFullError, match=rf"the scratch folder {scratch} has 1\.0 MB free, and staging in "
                                               r"\S+runs/r1/split needs 67\.1 MB .*point FASHION_TAGGER_SCRATCH at a "
                                               r"larger disk") as full:
        stage_in(store, "runs/r1/split", into, scratch=scratch)
    assert full.value.exit_code == 75 and "\n" not in str(full.value)
    assert not into.exists() and not list(scratch.rglob("*.*"))
    monkeypatch.setattr(scratch_module.shutil, "disk_usage", real_usage)

    real_download = store.download
    calls = []

    def disk_fills_up(key: str, dest: Path) -> Path:
        calls.append(key)
        if len(calls) == 2:
            with core_io.atomic_path(dest) as tmp:
                tmp.write_bytes(b"half of it")
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_download(key, dest)

    monkeypatch.setattr(store, "download", disk_fills_up)
    with pytest.raises(ScratchFullError, match=rf"the scratch folder {scratch} ran out of space while staging in"):
        stage_in(store, "runs/r1/split", into, scratch=scratch)
    cached = [p for p in scratch.rglob("*") if p.is_file()]
    assert all(not p.name.startswith(".") for p in cached), cached  # no temporary left behind
    assert all(hashlib.sha256(p.read_bytes()).hexdigest() == p.name for p in cached)  # nothing corrupt cached

    monkeypatch.setattr(store, "download", real_download)
    again = stage_in(store, "runs/r1/split", into, scratch=scratch)
    assert again.files == 3 and all((into / name).read_bytes() == data for name, data in OUTPUTS.items())
