"""Released weights by name, against a local HTTP server on 127.0.0.1: the first use downloads and verifies, the
second reuses the file, a corrupted file is refused, an unreachable host gets one line naming the URL and where to
place the file; a name goes wherever a weights path goes."""
import argparse
import hashlib
import http.server
import json
import os
import socket
import threading
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import detection  # noqa: F401  (makes detectron2 v0.6 importable)
from detection.checkpointer import SafeCheckpointer
from detection.cli import convert as convert_main
from detection.vit import ViT
from pretrain import cli
from pretrain.errors import CheckpointError
from pretrain.models import build_model
from pretrain.weights import releases
from pretrain.weights.loading import load_encoder, load_pretrain_model
from pretrain.weights.releases import RELEASES, Release, fetch, resolve_weights

TINY = dict(img_size=32, patch_size=8, depth=2, decoder_depth=1)


class _Server:
    """http.server over a folder in a thread, counting GET requests per path."""

    def __init__(self, root: Path) -> None:
        counts: dict[str, int] = {}

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self):
                counts[self.path] = counts.get(self.path, 0) + 1
                super().do_GET()

            def log_message(self, *args):
                pass

        self.counts = counts
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path, monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CROSSMAE_VITDET_CACHE", str(tmp_path / "cache"))
    (tmp_path / "www").mkdir()
    s = _Server(tmp_path / "www")
    yield s
    s.close()


def _publish(server: _Server, tmp_path: Path, name: str = "mae_vit_test", **kw) -> tuple[Release, bytes]:
    """A tiny MAE checkpoint on the server, and its release with the sha256 of those bytes."""
    torch.manual_seed(0)
    path = tmp_path / "www" / f"{name}.pth"
    torch.save({"model": build_model("mae_vit_tiny_patch16", **TINY).state_dict()}, path)
    data = path.read_bytes()
    sums = {"sha256": hashlib.sha256(data).hexdigest(), **kw}
    return Release(name, f"{server.url}/{path.name}", "test weights", "this test", norm_pix_loss=True, **sums), data


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


def test_first_use_downloads_and_verifies_the_second_reuses(server, tmp_path):
    release, data = _publish(server, tmp_path)
    path = fetch(release, progress=False)
    assert path == tmp_path / "cache" / "weights" / "mae_vit_test.pth" and path.read_bytes() == data
    assert server.counts == {"/mae_vit_test.pth": 1}
    assert fetch(release, progress=False) == path
    assert server.counts == {"/mae_vit_test.pth": 1}  # no second download


def test_md5_prefix_as_mae_publishes_it(server, tmp_path):
    release, data = _publish(server, tmp_path)
    release = Release(release.name, release.url, release.what, release.published,
                      md5_prefix=hashlib.md5(data).hexdigest()[:6])
    assert fetch(release, progress=False).read_bytes() == data


def test_a_corrupted_download_is_refused_and_deleted(server, tmp_path):
    release, _ = _publish(server, tmp_path)
    (tmp_path / "www" / "mae_vit_test.pth").write_bytes(b"not the published file")
    with pytest.raises(CheckpointError) as e:
        fetch(release, progress=False)
    msg = str(e.value)
    target = tmp_path / "cache" / "weights" / "mae_vit_test.pth"
    assert "\n" not in msg and release.url in msg and str(target) in msg and "sha256" in msg
    assert not target.exists()


def test_a_file_changed_in_the_cache_is_checked_again_and_refused_but_kept(server, tmp_path):
    release, _ = _publish(server, tmp_path)
    path = fetch(release, progress=False)
    path.write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="corrupt or another file") as e:
        fetch(release, progress=False)
    assert release.url in str(e.value) and path.read_bytes() == b"truncated"  # a file we did not write stays


def _same_size_and_mtime(path: Path, data: bytes) -> None:
    """Replace the bytes of `path` by `data` (of its size), keeping its modification time."""
    st = path.stat()
    assert len(data) == st.st_size
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_file_replaced_under_its_stamp_with_the_same_size_and_mtime_is_checked_again(server, tmp_path):
    release, data = _publish(server, tmp_path)
    path = fetch(release, progress=False)
    _same_size_and_mtime(path, bytes(len(data)))  # the stamp, untouched, still gives this size and mtime
    with pytest.raises(CheckpointError, match="corrupt or another file"):
        fetch(release, progress=False)


@pytest.mark.parametrize("forged", ["identity", "identity_and_sha256"])
def test_a_forged_stamp_does_not_skip_the_checksum(forged, server, tmp_path):
    # a file placed by hand with a stamp written for it: its size, mtime (and all else the stamp records) and the URL
    release, data = _publish(server, tmp_path)
    path = tmp_path / "cache" / "weights" / "mae_vit_test.pth"
    path.parent.mkdir(parents=True)
    path.write_bytes(bytes(len(data)))
    st = path.stat()
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "url": release.url}
    if forged == "identity_and_sha256":  # the stamp format of this version, with the hash of the forged file
        stamp.update(ctime_ns=st.st_ctime_ns, inode=st.st_ino, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    path.with_name(path.name + ".verified").write_text(json.dumps(stamp) + "\n")
    with pytest.raises(CheckpointError, match="corrupt or another file"):
        fetch(release, progress=False)
    assert server.counts == {}


def test_unreachable_host_is_one_line_with_url_and_place(tmp_path, monkeypatch):
    monkeypatch.setenv("CROSSMAE_VITDET_CACHE", str(tmp_path / "cache"))
    release = Release("mae_vit_test", f"http://127.0.0.1:{_closed_port()}/w.pth", "test", "this test")
    with pytest.raises(CheckpointError) as e:
        fetch(release, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("cannot download mae_vit_test from http://127.0.0.1:")
    assert f"place it at {tmp_path / 'cache' / 'weights' / 'w.pth'}" in msg


def test_http_error_is_one_line(server, tmp_path):
    release = Release("gone", f"{server.url}/missing.pth", "test", "this test")
    with pytest.raises(CheckpointError, match="HTTP 404") as e:
        fetch(release, progress=False)
    assert "\n" not in str(e.value)


def test_a_name_goes_wherever_a_path_goes(server, tmp_path, monkeypatch, capsys):
    release, _ = _publish(server, tmp_path)
    monkeypatch.setitem(RELEASES, release.name, release)
    model, info = load_pretrain_model(release.name)
    assert info["report"].source == "mae_vit_test" and info["family"] == "mae"
    encoder, _ = load_encoder(release.name)
    assert encoder.patch_embed.img_size == (32, 32)
    out = tmp_path / "d2.pth"
    assert convert_main([release.name, str(out), "--embed-dim", "192", "--depth", "2", "--patch-size", "8"]) == 0
    assert out.is_file() and server.counts == {"/mae_vit_test.pth": 1}  # downloaded once for all three


def test_a_name_goes_into_train_net_init(server, tmp_path, monkeypatch):
    release, _ = _publish(server, tmp_path)
    monkeypatch.setitem(RELEASES, release.name, release)
    model = nn.Module()
    model.backbone = nn.Module()
    model.backbone.net = ViT(img_size=32, patch_size=8, embed_dim=192, depth=2, num_heads=3, pretrain_img_size=32,
                             norm_layer=partial(nn.LayerNorm, eps=1e-6))
    SafeCheckpointer(model).load(release.name)  # what train.init_checkpoint=mae_vit_test does
    mae = load_pretrain_model(release.name)[0]
    assert torch.equal(model.backbone.net.blocks[1].attn.qkv.weight, mae.blocks[1].attn.qkv.weight)


def test_a_release_storing_args_needs_trust_pickle_in_every_tool(server, tmp_path, monkeypatch, capsys):
    release, _ = _publish(server, tmp_path)
    path = tmp_path / "www" / "mae_vit_test.pth"
    torch.save({**torch.load(path, weights_only=True), "args": argparse.Namespace(lr=1.5e-4)}, path)  # as MAE saves
    release = Release(release.name, release.url, release.what, release.published,
                      sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    monkeypatch.setitem(RELEASES, release.name, release)
    flags = [release.name, "--builtin", "1", "--output", str(tmp_path / "vis"), "--device", "cpu"]
    assert cli.visualize(flags) == 2
    assert "--trust-pickle" in capsys.readouterr().err
    assert cli.visualize(flags + ["--trust-pickle"]) == 0
    assert "official layout, loaded" in capsys.readouterr().out


def test_unknown_names_are_one_line():
    with pytest.raises(CheckpointError, match="neither a file nor a released-weights name; names: mae_vit_base"):
        resolve_weights("mae_vit_gigantic")
    assert resolve_weights("some/dir/file.pth") == Path("some/dir/file.pth")  # a path: read_checkpoint says "not found"


def test_crossmae_vit_h_is_the_readmes_prediction_ratio_0_25_run():
    base = "https://huggingface.co/longlian/CrossMAE/resolve/main/vith-mr0.75-kmr0.25-dd12/imagenet-mae-cross-vith-"
    assert RELEASES["crossmae_vit_huge"].url == base + "pretrain-wfm-mr0.75-kmr0.25-dd12-ep800-ui.pth"
    assert RELEASES["crossmae_vit_huge_finetune"].url == base + "finetune-wfm-mr0.75-kmr0.25-dd12-ep800-ui.pth"
    assert RELEASES["crossmae_vit_huge"].norm_pix_loss is True


def test_the_registry_names_official_urls():
    assert RELEASES["mae_vit_base"].url == "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base.pth"
    assert RELEASES["mae_vit_base"].md5_prefix == "8cad7c"
    assert all(r.url.startswith(("https://dl.fbaipublicfiles.com/mae/", "https://huggingface.co/longlian/CrossMAE/"))
               for r in RELEASES.values())
    assert {"crossmae_vit_small", "crossmae_vit_base", "crossmae_vit_large"} <= set(RELEASES)
    assert releases.weights_dir().name == "weights"
