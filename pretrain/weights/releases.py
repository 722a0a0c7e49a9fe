"""Released MAE and CrossMAE weights by name: the official URL, its published checksum, one verified download.

A name (`mae_vit_base`, `crossmae_vit_large`, ...) goes wherever a weights path goes. `resolve_weights` turns it
into a file in the cache, `$CROSSMAE_VITDET_CACHE/weights` (default `~/.cache/crossmae-vitdet/weights`):
downloaded once with a progress bar (`torch.hub.download_url_to_file`, which writes to a temporary file and
renames it), checked against the published checksum, and reused. A file placed there by hand is checked the same
way before its first use. A check leaves a `.verified` stamp with the file's identity and hashes, believed only for
that very file and for hashes that agree with the published checksum (`_vouched`). Offline, or on a mismatch, the
error names the URL and where to put the file by hand.

Checksums: facebookresearch/mae publishes the first 6 hex digits of the md5 of its three encoder files (README);
no other release publishes one in its repository. The CrossMAE files are on the Hugging Face hub, whose page for
each file shows its sha256 (git LFS object id). Where nothing is published the field is None: the download is
not verified, and the sha256 of the file is logged so that you can compare it with that page.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.error import URLError
from urllib.parse import urlparse

from torch.hub import download_url_to_file

from ..errors import CheckpointError
from ..sharded import is_sharded

__all__ = ["Release", "RELEASES", "weights_dir", "is_release_name", "release_of", "resolve_weights",
           "weights_file", "fetch"]

logger = logging.getLogger("pretrain.weights.releases")

_MAE = "https://dl.fbaipublicfiles.com/mae"
_CROSSMAE = "https://huggingface.co/longlian/CrossMAE/resolve/main"
_CROSSMAE_PAGE = "TonyLianLong/CrossMAE README (files on huggingface.co/longlian/CrossMAE)"


@dataclass(frozen=True)
class Release:
    """One released weights file.

    Attributes:
        name: what users type.
        url: the official download URL.
        what: one line on what the file holds.
        published: where the URL (and checksum, if any) is published.
        sha256: the published sha256, or None.
        md5_prefix: the published leading hex digits of the md5, or None.
        norm_pix_loss: whether its decoder predicts per-patch normalised pixels (None: no decoder).
    """

    name: str
    url: str
    what: str
    published: str
    sha256: str | None = None
    md5_prefix: str | None = None
    norm_pix_loss: bool | None = None

    @property
    def filename(self) -> str:
        return Path(urlparse(self.url).path).name

    @property
    def verify_hint(self) -> str:
        if self.sha256 or self.md5_prefix:
            return f"checked against the {'sha256' if self.sha256 else 'md5 prefix'} published in {self.published}"
        if "huggingface.co" in self.url:
            return f"compare `sha256sum FILE` with the SHA256 on {self.url.replace('/resolve/', '/blob/')}"
        return "no checksum is published; compare `sha256sum FILE` with a copy you trust"


def _mae(name: str, path: str, what: str, published: str, md5_prefix: str | None = None,
         norm_pix_loss: bool | None = None) -> Release:
    return Release(name, f"{_MAE}/{path}", what, published, md5_prefix=md5_prefix, norm_pix_loss=norm_pix_loss)


def _crossmae(name: str, folder: str, file: str, what: str, decoder: bool) -> Release:
    return Release(name, f"{_CROSSMAE}/{folder}/{file}", what, _CROSSMAE_PAGE, norm_pix_loss=True if decoder else None)


_RELEASES = (
    # facebookresearch/mae README: the paper's pretrained encoders, with md5 prefixes
    _mae("mae_vit_base", "pretrain/mae_pretrain_vit_base.pth", "MAE ViT-B/16 encoder", "facebookresearch/mae README",
         "8cad7c"),
    _mae("mae_vit_large", "pretrain/mae_pretrain_vit_large.pth", "MAE ViT-L/16 encoder",
         "facebookresearch/mae README", "b8b06e"),
    _mae("mae_vit_huge", "pretrain/mae_pretrain_vit_huge.pth", "MAE ViT-H/14 encoder", "facebookresearch/mae README",
         "9bdbb0"),
    # facebookresearch/mae issue #8 (K. He): the same runs with their decoders, "reconstruct normalized pixels"
    *(_mae(f"mae_vit_{s}_full", f"pretrain/mae_pretrain_vit_{s}_full.pth", f"MAE ViT-{s[0].upper()} with decoder",
           "facebookresearch/mae issue #8", norm_pix_loss=True) for s in ("base", "large", "huge")),
    # facebookresearch/mae demo notebook and issue #3: decoders trained on plain pixels, for visualisation
    *(_mae(f"mae_visualize_vit_{s}", f"visualize/mae_visualize_vit_{s}.pth",
           f"MAE ViT-{s[0].upper()} with a pixel decoder (visualisation)",
           "facebookresearch/mae demo notebook, issue #3", norm_pix_loss=False) for s in ("base", "large", "huge")),
    _mae("mae_visualize_vit_large_ganloss", "visualize/mae_visualize_vit_large_ganloss.pth",
         "MAE ViT-L with a pixel decoder trained with a GAN loss (visualisation)", "facebookresearch/mae demo notebook",
         norm_pix_loss=False),
    # TonyLianLong/CrossMAE README: 800 epochs, mask and prediction ratio 0.75 (448 px: 400 epochs; ViT-H: 0.25)
    _crossmae("crossmae_vit_small", "vits-mr0.75-kmr0.75-dd12",
              "imagenet-mae-cross-vits-pretrain-wfm-mr0.75-kmr0.75-dd12-ep800-ui.pth", "CrossMAE ViT-S/16 with decoder",
              True),
    _crossmae("crossmae_vit_base", "vitb-mr0.75-kmr0.75-dd12",
              "imagenet-mae-cross-vitb-pretrain-wfm-mr0.75-kmr0.75-dd12-ep800-ui.pth", "CrossMAE ViT-B/16 with decoder",
              True),
    _crossmae("crossmae_vit_base_448", "vitb-mr0.75-kmr0.75-dd12-448-400",
              "imagenet-mae-cross-vitb-pretrain-wfm-mr0.75-kmr0.25-dd12-ep400-ui-res-448.pth",
              "CrossMAE ViT-B/16 at 448 px with decoder", True),
    _crossmae("crossmae_vit_large", "vitl-mr0.75-kmr0.75-dd12",
              "imagenet-mae-cross-vitl-pretrain-wfm-mr0.75-kmr0.75-dd12-ep800-ui.pth", "CrossMAE ViT-L/16 with decoder",
              True),
    # ViT-H: mask ratio 0.75, prediction ratio 0.25 (the README's "kept mask ratio")
    _crossmae("crossmae_vit_huge", "vith-mr0.75-kmr0.25-dd12",
              "imagenet-mae-cross-vith-pretrain-wfm-mr0.75-kmr0.25-dd12-ep800-ui.pth", "CrossMAE ViT-H/14 with decoder",
              True),
    _crossmae("crossmae_vit_small_finetune", "vits-mr0.75-kmr0.75-dd12",
              "imagenet-mae-cross-vits-finetune-wfm-mr0.75-kmr0.75-dd12-ep800-ui.pth",
              "CrossMAE ViT-S/16 fine-tuned on ImageNet-1k", False),
    _crossmae("crossmae_vit_base_finetune", "vitb-mr0.75-kmr0.75-dd12",
              "imagenet-mae-cross-vitb-finetune-wfm-mr0.75-kmr0.75-dd12-ep800-ui.pth",
              "CrossMAE ViT-B/16 fine-tuned on ImageNet-1k", False),
    _crossmae("crossmae_vit_base_448_finetune", "vitb-mr0.75-kmr0.75-dd12-448-400",
              "imagenet-mae-cross-vitb-finetune-wfm-mr0.75-kmr0.25-dd12-ep400-ui-res-448.pth",
              "CrossMAE ViT-B/16 at 448 px fine-tuned on ImageNet-1k", False),
    _crossmae("crossmae_vit_large_finetune", "vitl-mr0.75-kmr0.75-dd12",
              "imagenet-mae-cross-vitl-finetune-wfm-mr0.75-kmr0.75-dd12-ep800-ui.pth",
              "CrossMAE ViT-L/16 fine-tuned on ImageNet-1k", False),
    _crossmae("crossmae_vit_huge_finetune", "vith-mr0.75-kmr0.25-dd12",
              "imagenet-mae-cross-vith-finetune-wfm-mr0.75-kmr0.25-dd12-ep800-ui.pth",
              "CrossMAE ViT-H/14 fine-tuned on ImageNet-1k", False),
)
RELEASES: dict[str, Release] = {r.name: r for r in _RELEASES}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def weights_dir() -> Path:
    """`$CROSSMAE_VITDET_CACHE/weights`, default `~/.cache/crossmae-vitdet/weights`."""
    root = os.environ.get("CROSSMAE_VITDET_CACHE") or Path.home() / ".cache" / "crossmae-vitdet"
    return Path(root) / "weights"


def is_release_name(value: str | Path, releases: dict[str, Release] | None = None) -> bool:
    """Whether `value` names a release (and is no existing file)."""
    return str(value) in (RELEASES if releases is None else releases) and not Path(value).exists()


def release_of(value: str | Path, releases: dict[str, Release] | None = None) -> Release | None:
    """The release `value` names, or None for a path."""
    return (RELEASES if releases is None else releases).get(str(value)) if is_release_name(value, releases) else None


_SAVED_FOLDER = ("model.safetensors", "pytorch_model.bin")  # what save_pretrained (transformers, timm) writes


def resolve_weights(value: str | Path, releases: dict[str, Release] | None = None, progress: bool = True) -> Path:
    """A weights path as given (a folder written by `save_pretrained`: its `model.safetensors`, else its
    `pytorch_model.bin`), or the cached (downloaded and verified on first use) file a release name names.

    Raises:
        CheckpointError: an unknown name (one that is no file and looks like no path), a folder without those files,
            a failed download or a checksum mismatch; one line each.
    """
    releases = RELEASES if releases is None else releases
    release = release_of(value, releases)
    if release is not None:
        return fetch(release, progress=progress)
    text = str(value)
    if Path(value).is_dir() and not is_sharded(value):  # a checkpoint folder: `read_checkpoint` reads it whole
        found = weights_file(value, releases)
        if found.is_dir():
            raise CheckpointError(f"{text} is a folder without {' or '.join(_SAVED_FOLDER)} (what save_pretrained "
                                  "writes); give a weights file or such a folder")
        return found
    if not Path(value).exists() and _NAME.match(text):  # a bare name, not a path: say which names exist
        raise CheckpointError(f"{text} is neither a file nor a released-weights name; names: {', '.join(releases)}")
    return Path(value)


def weights_file(value: str | Path, releases: dict[str, Release] | None = None) -> Path:
    """The file `resolve_weights(value)` reads, found without downloading: a release's place in the cache, the
    weights file of a `save_pretrained` folder, else `value` as a path (e.g. an input an output must not replace)."""
    release = release_of(value, releases)
    if release is not None:
        return weights_dir() / release.filename
    if Path(value).is_dir():
        return next((Path(value) / f for f in _SAVED_FOLDER if (Path(value) / f).is_file()), Path(value))
    return Path(value)


def _digests(path: Path) -> tuple[str, str]:
    sha, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
            md5.update(chunk)
    return sha.hexdigest(), md5.hexdigest()


def _stamp(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _identity(path: Path) -> dict[str, int]:
    """What tells this very file apart: size, modification and change times, inode. Rewriting it, even keeping its
    size and mtime (`touch -r`), gives a new ctime, which no user can set back."""
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino}


def _mismatch(release: Release, sha256: str, md5: str) -> str:
    """How the hashes differ from the release's published checksum; "" when they agree or none is published."""
    if release.sha256 and sha256 != release.sha256.lower():
        return f"sha256 {sha256[:16]}..., not the published {release.sha256[:16]}..."
    if release.md5_prefix and not md5.startswith(release.md5_prefix.lower()):
        return f"md5 {md5[:len(release.md5_prefix)]}..., not the published {release.md5_prefix}..."
    return ""


def _vouched(stamp: Path, here: dict[str, int], release: Release) -> bool:
    """Whether `stamp` was written for this very file (`_identity`) of this release, with hashes that agree with the
    published checksum."""
    try:
        seen = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(seen, dict) and all(seen.get(k) == v for k, v in here.items()) and seen.get("url") == release.url
            and isinstance(seen.get("sha256"), str) and isinstance(seen.get("md5"), str)
            and not _mismatch(release, seen["sha256"], seen["md5"]))


def _verify(path: Path, release: Release, downloaded: bool) -> None:
    """Check `path` against the release's checksum unless its stamp vouches for this very file (`_vouched`): the
    stamp records the file's identity and hashes, so a changed file, or a stamp of another file or without hashes
    that match, means hashing it again."""
    stamp = _stamp(path)
    here = _identity(path)
    if _vouched(stamp, here, release):
        return
    sha256, md5 = _digests(path)
    wrong = _mismatch(release, sha256, md5)
    if wrong:
        stamp.unlink(missing_ok=True)
        if downloaded:
            path.unlink(missing_ok=True)
            raise CheckpointError(f"{release.name}: the file downloaded from {release.url} has {wrong} (deleted); "
                                  f"retry, or download it by hand and place it at {path}")
        raise CheckpointError(f"{release.name}: {path} has {wrong}; it is corrupt or another file: delete it to "
                              f"download it again, or place the file from {release.url} there")
    if not (release.sha256 or release.md5_prefix):
        logger.warning("%s: no checksum is published for %s; its sha256 is %s (%s)", release.name, path.name, sha256,
                       release.verify_hint)
    stamp.write_text(json.dumps({**here, "url": release.url, "sha256": sha256, "md5": md5}) + "\n")


def fetch(release: Release, cache: str | Path | None = None, progress: bool = True) -> Path:
    """The release's file in the cache: downloaded once (with a progress bar), verified, then reused.

    Raises:
        CheckpointError: the download failed (offline, host unreachable, HTTP error) or the file does not match
            the published checksum; the message names the URL and where to place the file by hand.
    """
    path = Path(cache or weights_dir()) / release.filename
    downloaded = False
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        logger.info("downloading %s from %s to %s", release.name, release.url, path)
        try:
            download_url_to_file(release.url, str(path), progress=progress)
        except (OSError, ValueError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", None) or e
            if isinstance(e, URLError) and getattr(e, "code", None):
                reason = f"HTTP {e.code}"  # type: ignore[attr-defined]
            raise CheckpointError(f"cannot download {release.name} from {release.url} ({reason}); download it by "
                                  f"hand and place it at {path}") from None
        downloaded = True
    _verify(path, release, downloaded)
    return path
